// Ember status page: refresh the server-rendered body every few seconds (no framework, no CDN).
// The page works without this script; with it, <body data-refreshes> counts successful refreshes.
// When the controller checks API keys, the page asks for one, keeps it in this tab's
// sessionStorage and sends it as "Authorization: Bearer" with each refresh.
(function () {
  "use strict";
  var KEY = "ember-api-key";
  var body = document.body;
  var root = document.getElementById("status");
  var live = document.getElementById("live");
  var liveText = document.getElementById("live-text");
  var interval = Number(body.getAttribute("data-refresh-ms")) || 2000;
  var timer = null;
  var inFlight = false;
  var again = false;  // a refresh asked for while one was in flight (a key just submitted) runs after it

  function show(state, text) {
    live.setAttribute("data-state", state);
    liveText.textContent = text;
  }

  function clock() {
    return new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(refresh, delay);
  }

  function storedKey() {
    try { return sessionStorage.getItem(KEY); } catch (e) { return null; }
  }

  function askForKey(message) {
    clearTimeout(timer);
    show("error", "API key required");
    root.innerHTML = "";
    var section = document.createElement("section");
    section.className = "locked";
    var title = document.createElement("h2");
    title.textContent = "API key required";
    var text = document.createElement("p");
    text.className = "muted";
    text.textContent = message;
    var form = document.createElement("form");
    form.id = "key-form";
    var input = document.createElement("input");
    input.type = "password";
    input.id = "key-input";
    input.autocomplete = "off";
    input.placeholder = "an admin API key";
    var button = document.createElement("button");
    button.type = "submit";
    button.textContent = "Show status";
    form.appendChild(input);
    form.appendChild(button);
    var note = document.createElement("p");
    note.className = "muted small";
    note.textContent = "The key stays in this browser tab and is sent only to this controller.";
    section.appendChild(title);
    section.appendChild(text);
    section.appendChild(form);
    section.appendChild(note);
    root.appendChild(section);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      try { sessionStorage.setItem(KEY, input.value.trim()); } catch (e) { /* private mode: this load only */ }
      refresh();
    });
    input.focus();
  }

  function refresh() {
    if (inFlight) { again = true; return; }
    if (document.visibilityState === "hidden") { schedule(interval); return; }
    inFlight = true;
    var headers = { Accept: "text/html" };
    var key = storedKey();
    if (key) headers.Authorization = "Bearer " + key;
    fetch("status/fragment", { cache: "no-store", headers: headers })
      .then(function (response) {
        if (response.status === 401 || response.status === 403) {
          return response.json().then(function (data) {
            var error = new Error(data && data.error ? data.error.message : "HTTP " + response.status);
            error.locked = true;
            throw error;
          });
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        root.innerHTML = html;
        body.removeAttribute("data-locked");
        body.setAttribute("data-refreshes", String(Number(body.getAttribute("data-refreshes")) + 1));
        show("live", "live · updated " + clock());
        schedule(interval);
      })
      .catch(function (error) {
        if (error.locked) { askForKey(error.message); return; }
        show("error", "controller unreachable (" + error.message + ") · retrying");
        schedule(Math.min(interval * 4, 10000));
      })
      .finally(function () {
        inFlight = false;
        if (again) { again = false; refresh(); }
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible" && !body.hasAttribute("data-locked")) refresh();
  });
  if (body.hasAttribute("data-locked")) {
    if (storedKey()) {
      refresh();
    } else {
      var message = document.getElementById("locked-message");
      askForKey(message ? message.textContent : "This controller requires an API key.");
    }
  } else {
    show("live", "live · updated " + clock());
    schedule(interval);
  }
})();
