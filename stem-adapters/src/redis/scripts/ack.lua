-- ack: ARGV = ns, then (queue, tag, token) per receipt (see ack_lib.lua).
return ack_receipts(2, #ARGV)
