// Keyboard shortcuts for the labelling form: 1/a left, 2/b right, 3/t tie, s skip.
(function () {
  "use strict";
  var form = document.getElementById("label-form");
  if (!form) return;
  var buttons = {};
  form.querySelectorAll("button[data-keys]").forEach(function (button) {
    button.dataset.keys.split(" ").forEach(function (key) { buttons[key] = button; });
  });
  var sent = false;
  form.addEventListener("submit", function () { sent = true; });
  // Coming back with the browser's Back button restores the page as it was: allow a new answer.
  window.addEventListener("pageshow", function () { sent = false; });
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    var typing = target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT" || target.isContentEditable);
    if (typing) {
      if (event.key === "Escape") target.blur();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    var button = buttons[event.key.toLowerCase()];
    if (!button || sent) return;
    event.preventDefault();
    button.click();
  });
})();
