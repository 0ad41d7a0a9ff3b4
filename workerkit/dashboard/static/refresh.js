// Live refresh: every element with data-refresh and an id is fetched again every N seconds
// (N: the body's data-refresh-interval, from `workerkit dashboard --refresh`) from the same URL
// with ?fragment=ID, and replaced by the answer. No build step, nothing from another host.
(function () {
  "use strict";
  var body = document.body;
  var every = parseFloat(body.getAttribute("data-refresh-interval") || "0");
  if (!(every > 0) || !window.fetch) {
    return;
  }

  function refreshOne(node) {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", node.id);
    return fetch(url.toString(), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        var current = document.getElementById(node.id);
        if (!current || current.contains(document.activeElement)) {
          return; // gone, or the user is in one of its forms: next time
        }
        var holder = document.createElement("template");
        holder.innerHTML = html.trim();
        var fresh = holder.content.firstElementChild;
        if (fresh && fresh.id === node.id) {
          current.replaceWith(fresh);
        }
      });
  }

  var busy = false;
  function refreshAll() {
    if (busy || document.hidden) {
      return;
    }
    var nodes = Array.prototype.slice.call(document.querySelectorAll("[data-refresh][id]"));
    busy = true;
    Promise.all(nodes.map(refreshOne))
      .then(function () {
        body.classList.remove("refresh-failed");
      })
      .catch(function () {
        body.classList.add("refresh-failed");
      })
      .then(function () {
        busy = false;
      });
  }

  window.setInterval(refreshAll, every * 1000);
})();
