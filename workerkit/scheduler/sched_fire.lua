-- One fire, atomically: the checks, the unique record, and the engine's enqueue writes.
-- KEYS[1] lease hash, [2] schedule state, [3] fire record, [4] last fire, [5] record index,
-- [6] trigger requests, [7..] the keys of the enqueue writes, in order.
-- ARGV[1] epoch ('' for a standby's fire), [2] its holder, [3] fingerprint, [4] fire ms,
-- [5] job id, [6] reason, [7] retention ms, [8] number of writes, then per write: command, n,
-- n values. Every check and every type test comes before the first write: a script is not
-- rolled back. A leader's fire is fenced on holder and epoch both.
if ARGV[1] ~= '' then
  local cur = redis.call('HMGET', KEYS[1], 'holder', 'epoch')
  if cur[1] ~= ARGV[2] or cur[2] ~= ARGV[1] then return 'not_leader' end
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZREM', KEYS[6], ARGV[4])
  return 'already_fired'
end
-- Only the registered definition fires: not an unregistered, removed or changed one.
local st = redis.call('HMGET', KEYS[2], 'fingerprint', 'paused', 'removed')
if st[3] == '1' or st[1] ~= ARGV[3] then return 'stale' end
if st[2] == '1' then return 'paused' end
local types = {HSET = 'hash', RPUSH = 'list', LPUSH = 'list', SADD = 'set'}
local writes = {}
local i = 9
for k = 1, tonumber(ARGV[8]) do
  local command, n = ARGV[i], tonumber(ARGV[i + 1])
  local key = KEYS[6 + k]
  local want = types[command]
  if not want then return redis.error_reply('workerkit fire: unknown write ' .. command) end
  local have = redis.call('TYPE', key)['ok']
  if have ~= 'none' and have ~= want then
    return redis.error_reply('workerkit fire: ' .. key .. ' is a ' .. have .. ', not a ' .. want)
  end
  writes[k] = {command, key, i + 2, i + 1 + n}
  i = i + 2 + n
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('SET', KEYS[3], cjson.encode({now, ARGV[5], ARGV[6], ARGV[3]}), 'PX', ARGV[7], 'NX')
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[4])
local last = redis.call('HGET', KEYS[4], 'fire_ms')
if not last or tonumber(last) <= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[4], 'fire_ms', ARGV[4], 'recorded_ms', now, 'job_id', ARGV[5],
    'reason', ARGV[6], 'fingerprint', ARGV[3])
end
redis.call('ZREM', KEYS[6], ARGV[4])
for _, w in ipairs(writes) do
  redis.call(w[1], w[2], unpack(ARGV, w[3], w[4]))
end
return 'fired'
