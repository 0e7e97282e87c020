-- OpenMSK Node: Orthanc auto-routing. Forwards every stable MR series to the node's DICOM SCP.
--
-- `openmsk up` loads this script into the Orthanc it manages (LuaScripts) and registers the node there as the
-- DICOM modality "openmsk". To use it with an Orthanc of your own, add to its configuration:
--
--   "LuaScripts": ["/path/to/orthanc/autoroute.lua"],
--   "DicomModalities": { "openmsk": ["OPENMSK", "<node host>", 11112] }
--
-- A series is "stable" when Orthanc received no new instance of it for StableAge seconds (orthanc.json). Only
-- MR series are sent: the node's routing rules (scp/routing.toml) decide what happens to them, and the results
-- the node sends back (SEG, SR) are not MR, so nothing loops. The send runs as an asynchronous Orthanc job, so a
-- large series does not hold up Orthanc's other Lua events; a failed send stays in Orthanc's job list
-- (GET /jobs) and can be resubmitted from there.

local NODE_MODALITY = 'openmsk'
local FORWARDED_MODALITIES = { MR = true }

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if not FORWARDED_MODALITIES[modality] then
    return
  end
  local body = DumpJson({ Resources = { seriesId }, Asynchronous = true, Permissive = false }, true)
  local ok, answer = pcall(RestApiPost, '/modalities/' .. NODE_MODALITY .. '/store', body)
  if ok then
    print('OpenMSK: forwarding stable ' .. modality .. ' series ' .. seriesId .. ' to ' .. NODE_MODALITY)
  else
    print('OpenMSK: cannot forward series ' .. seriesId .. ' to ' .. NODE_MODALITY .. ': ' .. tostring(answer))
  end
end
