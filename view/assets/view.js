// caremesh view: what scripts add to a page that works without them.
// - Unticking a source hides its versions of entries, and entries it alone recorded.
// - "Copy reference" puts a citation of one source's entry on the clipboard.
// Without scripts every entry shows and the citation is in each button's data-reference.
"use strict";

function applySources() {
  var hidden = {};
  document.querySelectorAll("#sources input[data-source]").forEach(function (box) {
    hidden[box.getAttribute("data-source")] = !box.checked;
  });
  document.querySelectorAll(".caremesh-from[data-source], .caremesh-event[data-source]").forEach(function (from) {
    from.hidden = hidden[from.getAttribute("data-source")] === true;
  });
  document.querySelectorAll("tr.caremesh-entry").forEach(function (row) {
    var shown = row.querySelectorAll(".caremesh-from:not([hidden])").length;
    row.hidden = shown === 0;
  });
  // A summary line goes only when every source of its entry is hidden.
  document.querySelectorAll(".caremesh-summary li[data-sources]").forEach(function (line) {
    line.hidden = line.getAttribute("data-sources").split(" ").every(function (ods) {
      return hidden[ods] === true;
    });
  });
}

function copyReference(button) {
  var text = button.getAttribute("data-reference");
  var done = function () {
    button.textContent = "Copied";
    setTimeout(function () { button.textContent = "Copy reference"; }, 2000);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, function () { fallbackCopy(text, done); });
  } else {
    fallbackCopy(text, done);
  }
}

function fallbackCopy(text, done) {
  var area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "absolute";
  area.style.left = "-9999px";
  document.body.appendChild(area);
  area.select();
  try { document.execCommand("copy"); done(); } finally { document.body.removeChild(area); }
}

document.addEventListener("DOMContentLoaded", function () {
  document.body.classList.add("nhsuk-frontend-supported");
  document.querySelectorAll("#sources input[data-source]").forEach(function (box) {
    box.addEventListener("change", applySources);
  });
  document.querySelectorAll("button.caremesh-copy").forEach(function (button) {
    button.addEventListener("click", function () { copyReference(button); });
  });
});
