// caremesh view: what scripts add to a page that works without them.
// Unticking a source hides its items; every item is shown when scripts do not run.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.body.classList.add("nhsuk-frontend-supported");
  var boxes = document.querySelectorAll("#sources input[data-source]");
  boxes.forEach(function (box) {
    box.addEventListener("change", function () {
      var source = box.getAttribute("data-source");
      document.querySelectorAll("tr[data-source]").forEach(function (row) {
        if (row.getAttribute("data-source") === source) {
          row.hidden = !box.checked;
        }
      });
    });
  });
});
