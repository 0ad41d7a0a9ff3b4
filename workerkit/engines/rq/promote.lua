-- Put due deferred jobs back at the end of their queue (as RQ's scheduler would), unless an RQ
-- scheduler (--with-scheduler) holds the queue's lock: then it does, and a job it already moved
-- is only dropped from the deferred set. RQ's scheduler reads the due ids and moves them in a
-- later MULTI, so moving them here too while it runs could queue a job twice.
-- KEYS: deferred set, ScheduledJobRegistry, queue list, RQ scheduler lock.
-- ARGV: now (epoch seconds), job key prefix, enqueued_at (RQ's format), batch. Returns moved.
local rq_scheduler = redis.call('EXISTS', KEYS[4]) == 1
local moved = 0
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
for _, job_id in ipairs(due) do
  if redis.call('ZSCORE', KEYS[2], job_id) == false then
    redis.call('ZREM', KEYS[1], job_id)
  elseif not rq_scheduler then
    redis.call('ZREM', KEYS[1], job_id)
    redis.call('ZREM', KEYS[2], job_id)
    if redis.call('EXISTS', ARGV[2] .. job_id) == 1 then
      redis.call('HSET', ARGV[2] .. job_id, 'status', 'queued', 'enqueued_at', ARGV[3])
      redis.call('RPUSH', KEYS[3], job_id)
      moved = moved + 1
    end
  end
end
return moved
