-- The lease check shared by the fenced scripts (prepended to them): ARGV[1] is the token,
-- ARGV[2] the accepted states as "|run|release|" ("none" accepts a missing lease). True when
-- owned; false when another attempt holds the lease or its state is not accepted.
local function owned(lease, token, accepted)
  if not lease then
    return string.find(accepted, '|none|', 1, true) ~= nil
  end
  local sep = string.find(lease, ':', 1, true)
  if not sep then return false end
  local state = string.sub(lease, 1, sep - 1)
  if string.sub(lease, sep + 1) ~= token then return false end
  return string.find(accepted, '|' .. state .. '|', 1, true) ~= nil
end
