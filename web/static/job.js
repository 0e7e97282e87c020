// Job page: follows GET /api/jobs/<id> until the job is done or failed, then reloads to show the results.
(function () {
  "use strict";
  const root = document.getElementById("job");
  if (!root || ["done", "failed"].includes(root.dataset.state)) return;
  const url = root.dataset.statusUrl;
  const bar = document.getElementById("job-bar");
  const text = document.getElementById("job-progress-text");
  const badge = document.getElementById("job-state");

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 60) return (Number.isInteger(seconds) ? seconds : seconds.toFixed(1)) + " s";
    const minutes = Math.floor(seconds / 60);
    return minutes + " min " + String(Math.round(seconds % 60)).padStart(2, "0") + " s";
  }

  // The images' way to each archive destination, then the results' to each destination: one line each.
  function transfers(job) {
    const list = document.getElementById("transfers");
    if (!list) return;
    const items = [];
    Object.keys(job.archive || {}).forEach(function (name) {
      items.push(["archive", name, job.archive[name]]);
    });
    Object.keys(job.deliveries || {}).forEach(function (name) {
      items.push(["delivery", name, job.deliveries[name]]);
    });
    list.replaceChildren.apply(list, items.map(function (item) {
      const li = document.createElement("li");
      li.dataset[item[0]] = item[1];
      li.className = "transfer-" + item[2].status;
      li.textContent = item[2].summary;
      return li;
    }));
    list.hidden = items.length === 0;
  }

  function render(job) {
    bar.value = job.percent;
    badge.textContent = job.state;
    badge.className = "badge state-" + job.state;
    let line = Math.round(job.percent) + " %";
    if (job.stage && !["done", "failed"].includes(job.state)) line += " · " + job.stage;
    if (job.queue_position) line += " · position " + job.queue_position + " in the queue";
    if (job.eta_seconds !== null && job.eta_seconds !== undefined) line += " · about " + duration(job.eta_seconds) + " left";
    if (job.waiting) line += " · waiting: " + job.waiting;
    text.textContent = line;
    transfers(job);
    job.stages.forEach(function (stage) {
      const row = document.querySelector('tr[data-stage="' + stage.name + '"]');
      if (!row) return;
      row.className = "stage-" + stage.state;
      row.querySelector(".stage-state").textContent = stage.state;
      row.querySelector(".stage-duration").textContent = duration(stage.duration_s);
    });
  }

  function poll() {
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); throw new Error("signed out"); }
        return response.json();
      })
      .then(function (job) {
        render(job);
        if (job.state === "done" || job.state === "failed") { window.location.reload(); return; }
        window.setTimeout(poll, 1000);
      })
      .catch(function () { window.setTimeout(poll, 3000); });
  }
  window.setTimeout(poll, 500);
})();
