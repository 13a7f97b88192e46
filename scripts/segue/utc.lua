--- segue.utc: calendar arithmetic for the times chat protocols write as
--- text (IRCv3 server-time, XMPP's XEP-0082), in UTC and without the C
--- library's time zone. Used by segue.irc_format and segue.xmpp_format.
local M = {}

--- days_from_civil(y, m, d) -> days from 1970-01-01 to that date
--- (proleptic Gregorian; negative before 1970).
function M.days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

return M
