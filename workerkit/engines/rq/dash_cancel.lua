-- Cancel a waiting (queued) or scheduled job before it runs: it becomes failed, with the reason,
-- in the FailedJobRegistry (so it can still be retried). Fenced by the version and by the entry
-- itself: a job a worker has popped already (no longer in its list) is not cancelled.
-- A scheduled job due by ARGV[7] while RQ's scheduler holds its queue's lock is refused (-3):
-- that scheduler reads the due jobs, then saves them queued in a later MULTI, so a cancel in
-- between would leave the job failed and queued (and it would run).
-- After dash_version.lua. KEYS: job hash, queue list, scheduled registry, workerkit's deferred
-- set, failed registry, RQ's scheduler lock of the queue. ARGV: job id, version, ended_at, the
-- reason, failed score, expire s, the refusal horizon (epoch s). Returns as dash_retry.lua.
local version, status = version_of(KEYS[1])
if not version then return {-1, ''} end
if version ~= ARGV[2] then return {0, status} end
if status == 'queued' then
  if redis.call('LREM', KEYS[2], 0, ARGV[1]) == 0 then return {0, 'taken by a worker'} end
elseif status == 'scheduled' then
  local due = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if due and tonumber(due) <= tonumber(ARGV[7]) and redis.call('EXISTS', KEYS[6]) == 1 then
    return {-3, status}
  end
  if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return {0, status} end
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  return {-2, status}
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'ended_at', ARGV[3], 'exc_info', ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
return {1, 'failed'}
