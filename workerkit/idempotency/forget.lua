-- Delete the claim the token holds (its run failed).
-- KEYS[1] the record; ARGV token. Returns 1 when deleted.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] ~= 'in_progress' or rec[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
