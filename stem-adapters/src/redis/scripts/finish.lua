-- finish: the worker's common case in one call. ARGV = ns, ttl_ms, number of records, the
-- records (four arguments each, see status_lib.lua), then the receipts grouped by stream (see
-- ack_lib.lua). Records are written before the deliveries are finished, atomically.
-- Returns how many deliveries were finished.
local last = 3 + tonumber(ARGV[3]) * 4
set_records(ARGV[1], ARGV[2], 4, last)
return ack_receipts(last + 1, #ARGV)
