-- The dashboard's fence (prepended to its action scripts): a job "as the page showed it" is its
-- status and RQ's timestamps joined by '|' (dashboard.py's version_of computes the same).
-- Returns the version and the status, or nil when the job hash does not exist.
local function version_of(key)
  local f = redis.call('HMGET', key, 'status', 'enqueued_at', 'started_at', 'ended_at')
  if not f[1] then return nil, nil end
  local parts = {}
  for i = 1, 4 do parts[i] = f[i] or '' end
  return table.concat(parts, '|'), f[1]
end
