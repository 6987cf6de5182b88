-- wrk script for benchmarks/e2e.py's W4: every request carries a DPoP-bound access token
-- (`Authorization: DPoP <token>`) and a DPoP proof (`DPoP: <proof>`) that is sent exactly once,
-- as RFC 9449 wants (a proof's jti is remembered by the gateway; a second use is a replay).
-- wrk cannot sign, so the harness writes the proofs just before the run.
--   WRK_TOKENS=/path/tokens.txt  the access tokens, one per line (line k = token k, 0-based)
--   WRK_PROOFS=/path/proofs.txt  one proof per line: "<k> <proof>", k = the token it is for
--   WRK_PATH=/api/bench          request path (default /api/bench)
--   WRK_THREADS=1                wrk's -t: thread t sends proofs [t*n/T, (t+1)*n/T)
--   WRK_RESULT=/path/out.json    where done() writes the machine-readable summary
-- A thread that runs out of proofs starts its slice again (those requests are replays, so
-- the gateway rejects them); done() reports how many were sent as "overrun", and the harness
-- counts the run as an anomaly and makes more proofs next time.
-- Requests are pre-formatted once in init(): the per-request Lua cost is an index bump.

local counter = 0
local threads = {}

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local requests = {}
local n = 0
local i = 0
sent = 0 -- globals: read by done() through thread:get
fresh = 0

function init(args)
   local target = os.getenv("WRK_PATH") or "/api/bench"
   local tokens = {}
   for line in io.lines(os.getenv("WRK_TOKENS")) do
      if #line > 0 then
         tokens[#tokens + 1] = line
      end
   end
   local all = 0
   local threads_n = tonumber(os.getenv("WRK_THREADS") or "1") or 1
   local me = id or 0
   local proofs = os.getenv("WRK_PROOFS")
   for _ in io.lines(proofs) do
      all = all + 1
   end
   local first = math.floor(all * me / threads_n) + 1
   local last = math.floor(all * (me + 1) / threads_n)
   local k = 0
   for line in io.lines(proofs) do
      k = k + 1
      if k >= first and k <= last then
         local sp = string.find(line, " ", 1, true)
         local tok = tokens[tonumber(string.sub(line, 1, sp - 1)) + 1]
         n = n + 1
         requests[n] = wrk.format("GET", target, {
            ["Authorization"] = "DPoP " .. tok,
            ["DPoP"] = string.sub(line, sp + 1),
         })
      end
   end
   if n == 0 then
      error("no proofs for thread " .. me .. " in " .. proofs)
   end
   fresh = n
end

function request()
   sent = sent + 1
   i = i % n + 1
   return requests[i]
end

function done(summary, latency, requests)
   local out = os.getenv("WRK_RESULT")
   if out == nil then
      return
   end
   local over = 0
   for _, t in ipairs(threads) do
      local extra = (tonumber(t:get("sent")) or 0) - (tonumber(t:get("fresh")) or 0)
      if extra > 0 then
         over = over + extra
      end
   end
   local f = io.open(out, "w")
   local e = summary.errors
   f:write(string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, "overrun": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, summary.bytes, over,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean))
   f:close()
end
