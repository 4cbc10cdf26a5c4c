-- ack: ARGV = ns, then the receipts grouped by queue (see ack_lib.lua).
return ack_receipts(2, #ARGV)
