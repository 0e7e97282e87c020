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
-- the node sends back (SEG, SR, parametric maps) are not MR; its one MR output (the derived series a T2 map
-- is drawn over) names the node as Manufacturer and is not sent either. Nor is a series the node itself sent
-- here (a scanner that sends to the node first: the node archives the images in Orthanc over DICOM, so
-- Orthanc records the node's AE title as their RemoteAET): nothing loops. The send runs as an asynchronous Orthanc job, so a large series does not hold
-- up Orthanc's other Lua events; a failed send stays in Orthanc's job list (GET /jobs) and can be resubmitted.

local NODE_MODALITY = 'openmsk'
local FORWARDED_MODALITIES = { MR = true }
local NODE_MANUFACTURER = 'OpenMSK' -- worker/dicom/general.py MANUFACTURER

-- The AE title of the node as registered in DicomModalities (nil if Orthanc cannot tell).
local function NodeAet()
  local ok, answer = pcall(RestApiGet, '/modalities/' .. NODE_MODALITY .. '/configuration')
  if not ok then
    return nil
  end
  return ParseJson(answer)['AET']
end

-- True when the series' first instance reached Orthanc from the node (RemoteAET metadata).
local function SentByNode(seriesId)
  local aet = NodeAet()
  local ok, answer = pcall(RestApiGet, '/series/' .. seriesId)
  if aet == nil or not ok then
    return false
  end
  local instances = ParseJson(answer)['Instances']
  if instances == nil or instances[1] == nil then
    return false
  end
  local found, remote = pcall(RestApiGet, '/instances/' .. instances[1] .. '/metadata/RemoteAET')
  return found and remote == aet
end

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if not FORWARDED_MODALITIES[modality] then
    print('OpenMSK: not forwarding stable ' .. tostring(modality) .. ' series ' .. seriesId)
    return
  end
  if tags['Manufacturer'] == NODE_MANUFACTURER then
    -- the node's own derived images (the series a T2 map is drawn over): results, not input
    print('OpenMSK: series ' .. seriesId .. ' was made by the node; not sent back')
    return
  end
  if SentByNode(seriesId) then
    print('OpenMSK: series ' .. seriesId .. ' came from ' .. NODE_MODALITY .. '; not sent back')
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
