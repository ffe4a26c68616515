-- Argo CD health check for mirrorfleet.io/RegistryMirror (resource.customizations.health).
-- Healthy: the operator has acted on the current spec and Ready is True.
-- Progressing: not yet observed, or Ready is False while the fleet comes up or node agents apply
--   their config (reasons the operator uses while things converge).
-- Degraded: Ready is False for a reason that needs a person (invalid spec, missing Secret, ...).
-- (The Degraded condition, fewer replicas than asked while still serving, shows as Progressing.)
local hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the operator to act on this RegistryMirror"
if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Being deleted: node agents are removing their mirror config"
  return hs
end
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata and obj.metadata.generation or nil
if generation ~= nil and (obj.status.observedGeneration == nil or obj.status.observedGeneration < generation) then
  hs.message = "The operator has not acted on the latest spec yet"
  return hs
end
-- Reasons of Ready=False while the fleet converges (pods starting, a rollout, node agents
-- applying or removing their config): Progressing.
local converging = {
  ProxiesUnavailable = true, EdgeUnavailable = true, RollingOut = true, NodesNotReady = true,
  NodeAgentMissing = true, RemovingNodeConfig = true,
}
-- Reasons that need a person (a wrong spec, a missing Secret or key, the API refusing the
-- operator): Degraded. Unknown reasons count as Degraded too.
local needs_person = {
  InvalidSpec = true, SecretMissing = true, SecretKeyMissing = true,
  Forbidden = true, Rejected = true, Conflict = true, ApiError = true, BuildError = true,
  MissingMetadata = true, ApplyFailed = true, NodeConfigConflict = true,
}
local ready = nil
local degraded = nil
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    ready = c
  elseif c.type == "Degraded" and c.status == "True" then
    degraded = c
  end
end
if ready == nil then
  return hs
end
if ready.status == "True" then
  if degraded ~= nil then
    -- Serving, with fewer replicas than asked for (a rollout, or a pod that keeps failing).
    hs.status = "Progressing"
    hs.message = (degraded.reason or "Degraded") .. ": " .. (degraded.message or "")
    return hs
  end
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
if ready.reason ~= nil and converging[ready.reason] and not needs_person[ready.reason] then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
return hs
