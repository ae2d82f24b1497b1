-- raysegment: Orthanc pushes each stable MR series to the online segmentation service, which pulls
-- it over DICOMweb (WADO-RS), segments it and stores the DICOM SEGs back (STOW-RS), writing the
-- same ledger as the scheduled job (python -m raysegment.infer), so the two never redo each other's work.
--
-- Service: python -m raysegment.serve --model models:/raysegment-densenet121@champion \
--              --pacs http://ORTHANC:8042/dicom-web --output /data/segmentations [--token-file FILE]
-- Orthanc configuration (orthanc-raysegment.json beside this file): "LuaScripts" naming this file,
-- "StableAge" (seconds without a new instance before a series counts as complete).
-- Edit the two lines below: the service's base URL and its bearer token ("" when it asks none).
local SERVICE_URL = "http://127.0.0.1:8000"
local TOKEN = ""

function OnStableSeries(seriesId, tags, metadata)
   if tags["Modality"] ~= "MR" then
      return  -- SEGs the service stored back, and anything else that is no MR series
   end
   local study = ParseJson(RestApiGet("/series/" .. seriesId .. "/study"))
   local body = DumpJson({ study = study["MainDicomTags"]["StudyInstanceUID"],
                           series = tags["SeriesInstanceUID"] }, true)
   local headers = { ["Content-Type"] = "application/json" }
   if TOKEN ~= "" then
      headers["Authorization"] = "Bearer " .. TOKEN
   end
   -- The service answers 202 at once and works in the background; if it is down, the scheduled
   -- job segments the series on its next run.
   local ok, err = pcall(HttpPost, SERVICE_URL .. "/v1/pacs/series", body, headers)
   if not ok then
      print("raysegment: the service did not take series " .. tags["SeriesInstanceUID"] .. ": " .. tostring(err))
   end
end
