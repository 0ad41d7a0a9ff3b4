-- The pop of the task consumer (pop.py), without blocking. No pop of this worker is outstanding
-- when it runs, so an entry in one of its in-flight lists is stale (a late pop on an old
-- connection): that is delivered first, from where it is. Else the first entry found in the
-- queue keys, in kombu's order, moves from its queue's head (the right end) to its in-flight
-- list, in one step. Also this worker's liveness key, and the registry of in-flight lists.
-- KEYS[1]: the liveness key, KEYS[2]: the registry hash, KEYS[3]: the gone set (owner -> since
-- when recovery found it gone), KEYS[4..n+3]: the queue keys, KEYS[n+4..2n+3]: their in-flight
-- lists. ARGV[1]: the owner, ARGV[2]: the liveness TTL (ms), ARGV[3]: the index of the key a
-- blocking pop waits on next, ARGV[4..n+3]: each in-flight list's registry record.
-- Returns {index, entry, stale (0 or 1)}, or nil when every queue key is empty.
-- Written only when needed (an idle worker scans every second): the liveness key once half of
-- its TTL is gone, a registry record when it is missing (every record, when the liveness key
-- was gone: a recovery may have forgotten this worker's lists).
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) / 2 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
local n = (#KEYS - 3) / 2
if ttl == -2 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  for i = 1, n do redis.call('HSET', KEYS[2], KEYS[3 + n + i], ARGV[3 + i]) end
end
for i = 1, n do
  local stale = redis.call('LINDEX', KEYS[3 + n + i], -1)
  if stale then return {i, stale, 1} end
end
for i = 1, n do
  local entry = redis.call('RPOP', KEYS[3 + i])
  if entry then
    redis.call('LPUSH', KEYS[3 + n + i], entry)
    redis.call('HSETNX', KEYS[2], KEYS[3 + n + i], ARGV[3 + i])
    return {i, entry, 0}
  end
end
local b = tonumber(ARGV[3])
redis.call('HSETNX', KEYS[2], KEYS[3 + n + b], ARGV[3 + b])
return false
