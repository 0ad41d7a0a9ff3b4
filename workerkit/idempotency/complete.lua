-- Record the result, fenced by the owner token.
-- KEYS[1] the record; ARGV token, result, R (ms). Returns 1 when recorded, 0 when fenced out.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] ~= 'in_progress' or rec[2] ~= ARGV[1] then return 0 end
local retention = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'completed', 'result', ARGV[2],
  'expires_at', string.format('%d', now + retention), 'completed_at', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], retention)
return 1
