// Upload page: drag and drop, upload progress, and choosing a series when the upload holds several.
// Talks to POST /api/jobs with the session cookie and the page's CSRF token; without scripts the form
// posts to /upload and the server answers with pages instead.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const input = document.getElementById("file");
  const zone = document.getElementById("dropzone");
  const summary = document.getElementById("file-summary");
  const bar = document.getElementById("upload-bar");
  const status = document.getElementById("upload-status");
  const errorBox = document.getElementById("upload-error");
  const button = document.getElementById("upload-button");
  const seriesBox = document.getElementById("series-choice");
  const seriesList = document.getElementById("series-list");

  function megabytes(bytes) { return (bytes / 1048576).toFixed(bytes < 10485760 ? 1 : 0) + " MB"; }

  function describeFiles() {
    const files = Array.from(input.files);
    if (!files.length) { summary.textContent = "No file chosen"; return; }
    const total = files.reduce((sum, f) => sum + f.size, 0);
    summary.textContent = files.length === 1 ? files[0].name + " · " + megabytes(total)
      : files.length + " files · " + megabytes(total);
  }

  function showError(error) {
    document.getElementById("upload-error-message").textContent = error.message || "The upload failed.";
    document.getElementById("upload-error-hint").textContent = error.hint || "";
    errorBox.hidden = false;
  }

  function showSeries(series) {
    seriesList.replaceChildren();
    series.forEach(function (s, index) {
      const label = document.createElement("label");
      label.className = "radio";
      const radio = document.createElement("input");
      radio.type = "radio"; radio.name = "series_uid"; radio.value = s.series_uid; radio.checked = index === 0;
      const text = document.createElement("span");
      text.textContent = "#" + (s.number || "?") + " " + (s.description || "(no description)") + " · " +
        s.modality + " · " + s.instances + " images";
      label.append(radio, text);
      seriesList.append(label);
    });
    seriesBox.hidden = false;
  }

  function finish() { button.disabled = false; bar.hidden = true; }

  input.addEventListener("change", function () {
    describeFiles();
    seriesList.replaceChildren(); seriesBox.hidden = true; errorBox.hidden = true;
  });
  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function () { zone.classList.remove("over"); });
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      input.dispatchEvent(new Event("change"));
    }
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!input.files.length) { showError({ message: "Choose a file first." }); return; }
    const total = Array.from(input.files).reduce((sum, f) => sum + f.size, 0);
    if (total > Number(form.dataset.maxBytes)) {
      showError({ message: "The upload is larger than " + form.dataset.maxMb + " MB.",
        hint: "Send the one series to segment, not the whole study." });
      return;
    }
    errorBox.hidden = true;
    button.disabled = true;
    bar.hidden = false; bar.value = 0;
    status.textContent = "Uploading…";
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.api);
    xhr.setRequestHeader("X-CSRF-Token", csrf);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) return;
      bar.value = (100 * e.loaded) / e.total;
      status.textContent = e.loaded < e.total ? "Uploading… " + Math.round(bar.value) + " %" : "Checking the upload…";
    });
    xhr.addEventListener("load", function () {
      const body = xhr.response || {};
      if (xhr.status === 202 && body.page_url) {
        status.textContent = "Queued. Opening the job…";
        window.location.assign(body.page_url);
        return;
      }
      finish();
      status.textContent = "";
      const error = body.error || { message: "The upload failed (HTTP " + xhr.status + ")." };
      if (error.series && error.series.length) showSeries(error.series);
      showError(error);
    });
    xhr.addEventListener("error", function () {
      finish();
      status.textContent = "";
      showError({ message: "The connection broke off during the upload.", hint: "Check the file size and try again." });
    });
    xhr.send(new FormData(form));
  });
})();
