// itloop UI: small progressive enhancements; every page works without them.
(function () {
  "use strict";

  // Forms with data-confirm ask before they submit (the text comes from a data attribute,
  // never from inline script, so user-supplied names cannot become code).
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm) {
      if (!window.confirm(form.dataset.confirm)) {
        event.preventDefault();
      }
    }
  });

  // The schedule form: show the new-protocol fields only when "new protocol…" is chosen.
  function syncToggle(select) {
    var target = document.getElementById(select.dataset.toggles);
    if (!target) { return; }
    var isNew = select.value === "new";
    target.hidden = !isNew;
    target.querySelectorAll("input, select, textarea").forEach(function (el) {
      el.disabled = !isNew;
    });
  }
  document.addEventListener("change", function (event) {
    var el = event.target;
    if (el instanceof HTMLSelectElement && el.dataset.toggles) { syncToggle(el); }
  });
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("select[data-toggles]").forEach(syncToggle);
    var summary = document.getElementById("error-summary");
    if (summary) { summary.focus(); }
  });
})();
