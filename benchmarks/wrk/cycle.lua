-- wrk script for benchmarks/e2e.py: cycles through bearer tokens read from a file, starting
-- where the harness says (so a run can continue the previous run's cycle instead of
-- replaying tokens a verified-token cache still holds).
--   WRK_TOKENS=/path/tokens.txt  one token per line; empty or unset: no Authorization header
--   WRK_PATH=/api/bench          request path (default /api/bench)
--   WRK_OFFSET=0                 0-based index of the first token (default 0)
--   WRK_THREADS=1                wrk's -t: thread k starts at OFFSET + k * (n / THREADS)
--   WRK_RESULT=/path/out.json    where done() writes the machine-readable summary
--   WRK_CLOSE=1                  send Connection: close (a new connection per request)
-- Requests are pre-formatted once in init() so the per-request Lua cost is an index bump.

local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
end

local requests = {}
local n = 0
local i = 0

function init(args)
   local path = os.getenv("WRK_TOKENS") or ""
   local target = os.getenv("WRK_PATH") or "/api/bench"
   local close = (os.getenv("WRK_CLOSE") or "") ~= ""
   local function headers(token)
      local h = {}
      if token then h["Authorization"] = "Bearer " .. token end
      if close then h["Connection"] = "close" end
      return h
   end
   if path == "" then
      n = 1
      requests[1] = wrk.format("GET", target, headers(nil))
   else
      for line in io.lines(path) do
         if #line > 0 then
            n = n + 1
            requests[n] = wrk.format("GET", target, headers(line))
         end
      end
   end
   if n == 0 then
      error("no tokens in " .. path)
   end
   local offset = tonumber(os.getenv("WRK_OFFSET") or "0") or 0
   local threads = tonumber(os.getenv("WRK_THREADS") or "1") or 1
   local me = id or 0
   i = (offset + me * math.floor(n / threads)) % n
end

function request()
   i = i % n + 1
   return requests[i]
end

function done(summary, latency, requests)
   local out = os.getenv("WRK_RESULT")
   if out == nil then
      return
   end
   local f = io.open(out, "w")
   local e = summary.errors
   f:write(string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean))
   f:close()
end
