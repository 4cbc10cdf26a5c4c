-- set: ARGV = ns, ttl_ms, then the records (see status_lib.lua). Returns how many were written.
return set_records(ARGV[1], ARGV[2], 3, #ARGV)
