-- Read a record, expired or not.
-- KEYS[1] the record. Returns {state, fp, token, result, remaining ms, takeovers} or nil.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'token', 'result', 'expires_at',
  'takeovers')
if not rec[1] then return nil end
return {rec[1], rec[2], rec[3], rec[4] or '', tostring(tonumber(rec[5]) - now), rec[6]}
