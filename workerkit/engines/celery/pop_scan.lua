-- The pop of the task consumer (pop.py), without blocking: the first entry found in the
-- queue keys, in kombu's order, moves from its queue's head (the right end) to its in-flight
-- list, in one step. Also this worker's liveness key, and the registry of in-flight lists.
-- KEYS[1]: the liveness key, KEYS[2]: the registry hash, KEYS[3..n+2]: the queue keys,
-- KEYS[n+3..2n+2]: their in-flight lists. ARGV[1]: the owner, ARGV[2]: the liveness TTL (ms),
-- ARGV[3]: the index of the key a blocking pop waits on next, ARGV[4..n+3]: each in-flight
-- list's registry record. Returns {index, entry}, or nil when every queue key is empty.
-- Written only when needed (an idle worker scans every second): the liveness key once half of
-- its TTL is gone, a registry record when it is missing.
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) / 2 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
local n = (#KEYS - 2) / 2
for i = 1, n do
  local entry = redis.call('RPOP', KEYS[2 + i])
  if entry then
    redis.call('LPUSH', KEYS[2 + n + i], entry)
    redis.call('HSETNX', KEYS[2], KEYS[2 + n + i], ARGV[3 + i])
    return {i, entry}
  end
end
local b = tonumber(ARGV[3])
redis.call('HSETNX', KEYS[2], KEYS[2 + n + b], ARGV[3 + b])
return false
