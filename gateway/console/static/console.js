/* ctwa-gateway console: small enhancements over server-rendered pages (no inline script). */
(function () {
  "use strict";

  // Sign-in: post the form with fetch so a refusal shows the API's message next to the field
  // (the error envelope's `error`) instead of replacing the page; success follows the
  // redirect to the page asked for.
  var form = document.querySelector("form[data-fetch]");
  if (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var alert = document.getElementById("sign-in-error");
      var button = form.querySelector("button[type=submit]");
      alert.textContent = "";
      button.disabled = true;
      fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        credentials: "same-origin",
        headers: { "Accept": "application/json" },
      }).then(function (response) {
        if (response.ok && response.redirected) {
          form.reset();
          window.location.assign(response.url);
          return null;
        }
        return response.json().then(function (body) {
          alert.textContent = body && body.error ? body.error : "Sign-in failed (HTTP " + response.status + ").";
        }, function () {
          alert.textContent = "Sign-in failed (HTTP " + response.status + ").";
        });
      }).catch(function () {
        alert.textContent = "The gateway did not answer; is it running?";
      }).finally(function () {
        button.disabled = false;
        var key = document.getElementById("key");
        if (key) { key.value = ""; key.focus(); }
      });
    });
  }
})();
