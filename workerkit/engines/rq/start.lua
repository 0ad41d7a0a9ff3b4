-- The start of an attempt, whole or not at all: the lease is taken (SET NX in effect) and RQ's
-- start bookkeeping written only when no other attempt holds the job and it is still queued, so
-- that an id queued twice (Redis restarted from an append-only file older than a pop, an id
-- pushed back) never starts two attempts, nor one of a job that has run.
-- KEYS: lease, job hash, started set. ARGV: token, lease ms, member, score, then RQ's start
-- writes, each as its argument count followed by the command and its arguments.
-- Returns {1} when started (also when this attempt's start landed already: a lost reply),
-- {0, lease} when another attempt holds the job, {-1, status} when the job is not queued.
local lease = redis.call('GET', KEYS[1])
if lease == 'run:' .. ARGV[1] then return {1} end
if lease then return {0, lease} end
local status = redis.call('HGET', KEYS[2], 'status')
if status and status ~= 'queued' then return {-1, status} end
redis.call('SET', KEYS[1], 'run:' .. ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
local i = 5
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return {1}
