--- segue.metrics: the counters the router, the postbox, backend requests and
--- the client API keep, rendered in the Prometheus text format for
--- GET /metrics (docs/api.md).
---
--- One source for every counter: modules call M.inc / M.observe with a
--- metric name and labels; values that are state rather than events
--- (restarts, queue depths, rule loads) are read when rendering, through
--- M.collect(fn). Bounded: label values are backend, bridge and peer names
--- from the config and its rules, or fixed words (outcomes, reasons), so a
--- series is never created from what a client or peer sends.
local M = {}

local families = {}  -- name -> { type, help, series = { [key] = { labels, value | buckets } } }
local order = {}     -- names, in definition order
local collectors = {}

-- Seconds, for request latency: 1 ms to 60 s.
M.BUCKETS = { 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60 }

--- define(name, type, help): "counter", "gauge" or "histogram". Defining a
--- name again keeps the first definition (modules reload).
function M.define(name, kind, help)
  if families[name] then return end
  families[name] = { type = kind, help = help, series = {} }
  order[#order + 1] = name
end

local function key_of(labels)
  local names = {}
  for k in pairs(labels or {}) do names[#names + 1] = k end
  table.sort(names)
  local parts = {}
  for i, k in ipairs(names) do parts[i] = k .. "\0" .. tostring(labels[k]) end
  return table.concat(parts, "\1"), names
end

local function series(name, labels)
  local f = families[name]
  if not f then error("metric " .. name .. " is not defined", 3) end
  local key, names = key_of(labels)
  local s = f.series[key]
  if not s then
    s = { labels = labels or {}, names = names, value = 0 }
    if f.type == "histogram" then
      s.buckets, s.sum = {}, 0
      for i = 1, #M.BUCKETS do s.buckets[i] = 0 end
    end
    f.series[key] = s
  end
  return s
end

--- inc(name, labels [, n]): adds n (default 1) to a counter or gauge.
function M.inc(name, labels, n)
  local s = series(name, labels)
  s.value = s.value + (n or 1)
end

--- set(name, labels, value): a gauge's value.
function M.set(name, labels, value) series(name, labels).value = value end

--- observe(name, labels, value): one observation of a histogram.
function M.observe(name, labels, value)
  local s = series(name, labels)
  s.value, s.sum = s.value + 1, s.sum + value
  for i, le in ipairs(M.BUCKETS) do
    if value <= le then s.buckets[i] = s.buckets[i] + 1 end
  end
end

--- collect(fn): fn() runs before each render, to set gauges and counters
--- read from state.
function M.collect(fn) collectors[#collectors + 1] = fn end

--- reset(name): forgets the series of a metric (for collected values whose
--- label sets change, such as removed backends).
function M.reset(name) if families[name] then families[name].series = {} end end

local function escape(v)
  return (tostring(v):gsub("\\", "\\\\"):gsub("\n", "\\n"):gsub('"', '\\"'))
end

local function label_text(s, extra)
  local parts = {}
  for _, k in ipairs(s.names) do parts[#parts + 1] = ('%s="%s"'):format(k, escape(s.labels[k])) end
  if extra then parts[#parts + 1] = extra end
  if #parts == 0 then return "" end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function number(v)
  if v == math.huge then return "+Inf" end
  if math.type(v) == "integer" then return tostring(v) end
  return ("%.17g"):format(v)
end

--- render() -> the Prometheus text exposition format (version 0.0.4).
function M.render()
  for _, fn in ipairs(collectors) do
    local ok, err = pcall(fn)
    if not ok then require("segue").log.warn("metrics collector failed: " .. tostring(err)) end
  end
  local out = {}
  for _, name in ipairs(order) do
    local f = families[name]
    out[#out + 1] = ("# HELP %s %s"):format(name, f.help:gsub("\\", "\\\\"):gsub("\n", "\\n"))
    out[#out + 1] = ("# TYPE %s %s"):format(name, f.type)
    local keys = {}
    for k in pairs(f.series) do keys[#keys + 1] = k end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local s = f.series[k]
      if f.type == "histogram" then
        for i, le in ipairs(M.BUCKETS) do
          out[#out + 1] = ("%s_bucket%s %s"):format(name, label_text(s, ('le="%g"'):format(le)), number(s.buckets[i]))
        end
        out[#out + 1] = ("%s_bucket%s %s"):format(name, label_text(s, 'le="+Inf"'), number(s.value))
        out[#out + 1] = ("%s_sum%s %s"):format(name, label_text(s), number(s.sum))
        out[#out + 1] = ("%s_count%s %s"):format(name, label_text(s), number(s.value))
      else
        out[#out + 1] = ("%s%s %s"):format(name, label_text(s), number(s.value))
      end
    end
  end
  return table.concat(out, "\n") .. "\n"
end

-- The metrics of the parts outside the API; defined here so /metrics shows
-- them (with no series) before the first event.
M.define("segue_messages_routed_total", "counter", "Copies the router sent through a bridge, by outcome (sent or failed).")
M.define("segue_backend_requests_total", "counter", "Requests to backends, by outcome (ok or the error code).")
M.define("segue_backend_request_duration_seconds", "histogram", "Time from a request to a backend until its answer.")
M.define("segue_backend_restarts_total", "counter", "Restarts of each backend since segue started.")
M.define("segue_postbox_queue_depth", "gauge", "Events queued for a federation peer.")
M.define("segue_postbox_pushes_total", "counter", "Pushes to federation peers, by outcome.")
M.define("segue_postbox_pulls_total", "counter", "Pulls from federation peers, by outcome.")
M.define("segue_rules_loads_total", "counter", "Rule sets loaded (the first load and every reload).")
M.define("segue_rules_load_failures_total", "counter", "Rule loads that failed (the previous rules kept running).")

--- request(backend, outcome, t0): one backend request finished; t0 is
--- loop.hrtime() at its start. The series are looked up once per backend
--- and outcome: this runs for every request.
local hrtime = require("segue.loop").hrtime
local request_series = {}  -- backend -> { histogram, [outcome] = counter }
local function request_of(backend, outcome)
  local r = request_series[backend]
  if not r then
    r = { hist = series("segue_backend_request_duration_seconds", { backend = backend }) }
    request_series[backend] = r
  end
  local c = r[outcome]
  if not c then
    c = series("segue_backend_requests_total", { backend = backend, outcome = outcome })
    r[outcome] = c
  end
  return c, r.hist
end

--- requests(backend, outcome, n, sum, buckets): n requests at once, their
--- durations summed (seconds) and counted per bucket of M.BUCKETS (the
--- router's C path says so once per loop turn).
function M.requests(backend, outcome, n, sum, buckets)
  local c, s = request_of(backend, outcome)
  c.value = c.value + n
  s.value, s.sum = s.value + n, s.sum + sum
  for i = 1, #M.BUCKETS do s.buckets[i] = s.buckets[i] + (buckets[i] or 0) end
end

function M.request(backend, outcome, t0)
  outcome = outcome or "error"
  local c, s = request_of(backend, outcome)
  c.value = c.value + 1
  local v = (hrtime() - t0) / 1e9
  s.value, s.sum = s.value + 1, s.sum + v
  for i, le in ipairs(M.BUCKETS) do
    if v <= le then s.buckets[i] = s.buckets[i] + 1 end
  end
end

return M
