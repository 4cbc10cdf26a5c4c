-- ack: ARGV = ns, then the receipts grouped by stream (see ack_lib.lua).
return ack_receipts(2, #ARGV)
