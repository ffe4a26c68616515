-- The proxy pod's front (port 5000, in the upstream sidecar's Envoy): every pull passes here on
-- its way to the registry. For a manifest request it reads the sidecar's own upstream counters
-- before (a reading at most a second old) and after the registry answered (only for an answer
-- by tag, or a failed one). If the upstream failed in between (a lookup timed
-- out, was refused, rate-limited or answered 5xx, or the upstream fails its health checks):
--   * a manifest served by tag came from the cache: counted as served stale;
--   * a failed one gets an answer that says why (503 UNAVAILABLE, or 429 TOOMANYREQUESTS)
--     instead of Distribution's "manifest unknown", and is counted as a failed pull.
-- Envoy's Lua has no counters of its own: a count is one local request to a cluster named for
-- it, which Envoy's cluster stats carry (`cluster.<name>.upstream_rq_total`).
-- Placeholders (@...@) are filled in by sidecar.rs.

local UPSTREAM = "@UPSTREAM@"
local STATS = "@STATS_PATH@"
local KEY = "mirrorfleet.front"

local function counters(handle)
  local headers, body = handle:httpCall("@ADMIN_CLUSTER@",
    {[":method"] = "GET", [":path"] = STATS, [":authority"] = "admin"}, "", 250)
  if headers == nil or headers[":status"] ~= "200" or body == nil then
    return nil
  end
  local c = {lookup = 0, healthy = 1}
  for name, value in string.gmatch(body, "([%w_%.]+): (%d+)") do
    local n = tonumber(value)
    local vcluster = string.match(name, "%.vcluster%.[%w_]+%.upstream_rq_(.+)$")
    if vcluster ~= nil then
      c.lookup = c.lookup + n
    else
      local cluster, stat = string.match(name, "^cluster%.([%w_]+)%.(.+)$")
      if stat == "membership_healthy" then
        -- Any upstream cluster with no healthy host: the upstream is unreachable.
        if n == 0 then c.healthy = 0 end
      elseif stat ~= nil then
        c[stat] = (c[stat] or 0) + n
      end
    end
  end
  return c
end

-- The newest reading (per worker; the sidecar runs one): a request's "before" when it is at most
-- a second old, so a burst of pulls costs one admin read per answer judged, not two per request.
local last = nil

local function snapshot(handle)
  local c = counters(handle)
  if c ~= nil then
    last = {at = os.time(), c = c}
  end
  return c
end

local function count(handle, cluster)
  handle:httpCall(cluster, {[":method"] = "GET", [":path"] = "/ready", [":authority"] = "count"}, "", 500, true)
end

function envoy_on_request(handle)
  local body = handle:body()
  local headers = handle:headers()
  local method = headers:get(":method")
  if method ~= "GET" and method ~= "HEAD" then
    return
  end
  local name, ref = string.match(headers:get(":path") or "", "^/v2/(.+)/manifests/([^/?]+)")
  if name == nil then
    return
  end
  local before = nil
  if last ~= nil and os.time() - last.at <= 1 then
    before = last.c
  else
    before = snapshot(handle)
  end
  if before == nil then
    return
  end
  local meta = handle:streamInfo():dynamicMetadata()
  meta:set(KEY, "name", name)
  meta:set(KEY, "ref", ref)
  for k, v in pairs(before) do
    meta:set(KEY, k, v)
  end
end

function envoy_on_response(handle)
  local before = handle:streamInfo():dynamicMetadata():get(KEY)
  if before == nil then
    return
  end
  local status = tonumber(handle:headers():get(":status")) or 0
  local by_tag = string.find(before.ref, ":", 1, true) == nil
  -- The mirror's own answers (auth, redirects) and digests served from storage say nothing here.
  if (status < 300 and not by_tag) or (status >= 300 and status < 404) then
    return
  end
  -- A failed answer is held (it is small) until judged; the counters are read meanwhile.
  -- (A body object does not outlive the httpCall's yield: it is asked for again below.)
  if status >= 400 then
    handle:body()
  end
  local after = snapshot(handle)
  if after == nil then
    return
  end
  local function moved(k)
    return (after[k] or 0) - (before[k] or 0)
  end
  local failed = moved("lookup") > 0
  if status < 300 then
    if failed then
      count(handle, "@STALE_CLUSTER@")
    end
    return
  end
  if not failed and after.healthy ~= 0 then
    return
  end
  count(handle, "@FAILED_CLUSTER@")
  -- Envoy's own 503s for a host it cannot use count as 5xx too: only more 5xx than those are
  -- the upstream's answers.
  local local_503 = moved("upstream_cx_connect_fail") + moved("upstream_cx_none_healthy")
    + moved("upstream_rq_pending_failure_eject")
  local http, code, reason, why = "503", "UNAVAILABLE", "HealthCheckFailed",
    "is down (its health checks get no connection, no answer or a 5xx)"
  if moved("upstream_rq_429") > 0 then
    -- 429 tells clients to come back later (some retry at once, with backoff).
    http, code, reason, why = "429", "TOOMANYREQUESTS", "RateLimited", "is rate-limiting this mirror (429)"
  elseif moved("upstream_cx_connect_timeout") > 0 then
    reason, why = "ConnectTimeout", "did not accept a connection within @CONNECT_TIMEOUT@"
  elseif moved("upstream_cx_connect_fail") > 0 then
    reason, why = "ConnectFailed", "refused the connection"
  elseif moved("upstream_rq_timeout") > 0 then
    reason, why = "Timeout", "did not answer within @LOOKUP_TIMEOUT@"
  elseif moved("upstream_rq_5xx") > local_503 then
    reason, why = "ServerError", "answered with a server error (5xx)"
  end
  local sep = by_tag and ":" or "@"
  local message = before.name .. sep .. before.ref .. " is not in this mirror's cache and its upstream "
    .. UPSTREAM .. " " .. why
  local json = '{"errors":[{"code":"' .. code .. '","message":"' .. message
    .. '","detail":{"upstream":"' .. UPSTREAM .. '","reason":"' .. reason .. '"}}]}'
  local body = handle:body()
  local headers = handle:headers()
  headers:replace(":status", http)
  headers:replace("content-type", "application/json; charset=utf-8")
  headers:replace("x-mirrorfleet-upstream-error", reason)
  -- A HEAD answer has no body: its status says it (containerd resolves tags with HEAD).
  if body ~= nil then
    headers:replace("content-length", tostring(#json))
    body:setBytes(json)
  end
end
