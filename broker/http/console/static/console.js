// mqttprov console: light progressive enhancement. Every page works without this file; with it,
// figures and lists refresh themselves, secrets can be copied, and dangerous forms ask first.
"use strict";

const POLL_MS = 1000;

// Replace the content of each [data-poll] element with its URL's fragment, every POLL_MS while the
// tab is visible. Checked boxes stay checked; a session that ended sends the page to the login.
function poll(element) {
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(element.dataset.poll, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
        return;
      }
      if (!response.ok) return;
      const html = await response.text();
      const checked = new Set(
        Array.from(element.querySelectorAll("input[type=checkbox]:checked"), (box) => box.value)
      );
      const focused = document.activeElement && element.contains(document.activeElement)
        ? document.activeElement.id : null;
      element.innerHTML = html;
      element.querySelectorAll("input[type=checkbox]").forEach((box) => { box.checked = checked.has(box.value); });
      if (focused) document.getElementById(focused)?.focus();
    } catch (error) {
      // The server may be restarting: try again on the next tick.
    } finally {
      busy = false;
    }
  }
  window.setInterval(refresh, POLL_MS);
}

function copyButtons() {
  document.querySelectorAll("button[data-copy]").forEach((button) => {
    button.hidden = false;
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      try {
        await navigator.clipboard.writeText(source.textContent.trim());
        button.textContent = "Copied";
      } catch (error) {
        window.getSelection().selectAllChildren(source);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  });
}

function confirmations() {
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
  // A typed confirmation: the button is enabled once the text matches (the server checks it too).
  document.querySelectorAll("input[data-must-equal]").forEach((input) => {
    const button = input.form.querySelector("button[type=submit]");
    // A MAC in any notation: compared without separators or case, as the server compares it.
    const bare = (text) => text.trim().toLowerCase().replace(/[:.-]/g, "");
    const update = () => { button.disabled = bare(input.value) !== bare(input.dataset.mustEqual); };
    input.addEventListener("input", update);
    update();
  });
}

function selectAll() {
  document.querySelectorAll("input[data-select-all]").forEach((master) => {
    master.hidden = false;
    master.addEventListener("change", () => {
      document.querySelectorAll(master.dataset.selectAll).forEach((box) => { box.checked = master.checked; });
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-poll]").forEach(poll);
  copyButtons();
  confirmations();
  selectAll();
});
