-- Claim a key unless a live record holds it.
-- KEYS[1] the record; ARGV fingerprint, token, Ip (ms).
-- Returns {outcome, token | result | remaining ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ip = tonumber(ARGV[3])
local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'result', 'expires_at', 'takeovers')
local state = rec[1]
if state then
  local remaining = tonumber(rec[4]) - now
  if remaining > 0 then
    if rec[2] ~= ARGV[1] then return {'mismatch', ''} end
    if state == 'completed' then return {'replay', rec[3]} end
    return {'in_progress', tostring(remaining)}
  end
end
local takeovers = 0
if state == 'in_progress' then takeovers = (tonumber(rec[5]) or 0) + 1 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'in_progress', 'fp', ARGV[1], 'token', ARGV[2],
  'expires_at', string.format('%d', now + ip), 'takeovers', takeovers,
  'claimed_at', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], 2 * ip)
if takeovers > 0 then return {'taken_over', ARGV[2]} end
return {'claimed', ARGV[2]}
