// The taskmill dashboard: a task list, a task page and a form to start a task.
//
// Views are chosen by the URL fragment: "#/" (the list, with "?status=&name="),
// "#/tasks/ID" and "#/new". Data comes from the task API by URLs relative to
// this page, and live changes from its server-sent event streams: the server
// polls the database and sends each changed task at most once per poll.
//
// A server that answers 401 with "WWW-Authenticate: APIKey" gets a form that
// asks for the key. The key is kept in sessionStorage, so it lasts as long as
// the tab and is not written to the profile for later sessions as
// localStorage would. It goes in the X-API-Key header of every request, and
// in the api_key query parameter of the event streams, because EventSource
// cannot send headers.
"use strict";

const STATUSES = ["PENDING", "RUNNING", "PAUSED", "FINISHED", "FAILED", "STOPPED"];
const PAGE_SIZE = 50;
// Milliseconds before reopening a stream that the server rejected (401, 503...).
// A stream that merely dropped is reopened by the browser itself.
const REOPEN_DELAY = 5000;
const KEY_STORAGE = "taskmill.apiKey";

// -- helpers --

// Build an element: el("a", {href: "#/", className: "x"}, "text", child, ...).
function el(tag, properties = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(properties)) {
    if (name === "role" || name.includes("-")) {
      element.setAttribute(name, value);
    } else {
      element[name] = value;
    }
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      element.append(child);
    }
  }
  return element;
}

function byId(id) {
  return document.getElementById(id);
}

class ApiError extends Error {
  constructor(status, body) {
    super(describeError(status, body));
    this.status = status;
    this.body = body;
  }
}

function describeError(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") {
    return detail;
  }
  if (Array.isArray(detail)) {
    return detail.map((item) => `${(item.loc || []).slice(1).join(".")}: ${item.msg}`).join("; ");
  }
  return `The server answered ${status}.`;
}

// -- the API key --

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // Storage disabled: currentKey() uses the key kept in memory.
  }
}

function storeKey(key) {
  try {
    sessionStorage.setItem(KEY_STORAGE, key);
  } catch {
    // Storage disabled: the key lasts until the page is left.
  }
  memoryKey = key;
}

let memoryKey = "";
let keyRequest = null; // A promise while the key form is shown.

function currentKey() {
  return storedKey() || memoryKey;
}

// True for a 401 that requests an API key, rather than another kind of
// credentials that the browser or an app's login handles.
function asksForKey(response) {
  const scheme = (response.headers.get("www-authenticate") || "").trim().split(/\s+/)[0];
  return response.status === 401 && scheme.toLowerCase() === "apikey";
}

// Show the key form, once for all the requests that were rejected with
// rejectedKey; resolve when a new key is stored.
function askForKey(rejectedKey) {
  if (currentKey() !== rejectedKey) {
    return Promise.resolve(); // A newer key was entered meanwhile: retry with it.
  }
  if (!keyRequest) {
    keyRequest = new Promise((resolve) => {
      const form = byId("key-form");
      byId("key-message").textContent = rejectedKey
        ? "The server rejected this API key. Enter the correct key."
        : "This server requires an API key. Enter it to see and control tasks.";
      form.hidden = false;
      byId("key-input").value = "";
      byId("key-input").focus();
      form.onsubmit = (event) => {
        event.preventDefault();
        const key = byId("key-input").value.trim();
        if (!key) {
          return;
        }
        storeKey(key);
        form.hidden = true;
        keyRequest = null;
        resolve();
        LiveStream.reopenAll();
      };
    });
  }
  return keyRequest;
}

function withKey(url) {
  const key = currentKey();
  if (!key) {
    return url;
  }
  const separator = url.includes("?") ? "&" : "?";
  return `${url}${separator}api_key=${encodeURIComponent(key)}`;
}

// Call the task API; return the JSON body, or throw an ApiError. A request
// rejected for want of an API key is sent again once the key is entered.
async function api(method, path, body) {
  const options = {method, headers: {accept: "application/json"}};
  if (body !== undefined) {
    options.headers["content-type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  for (;;) {
    const key = currentKey();
    if (key) {
      options.headers["x-api-key"] = key;
    }
    response = await fetch(path, options);
    if (!asksForKey(response)) {
      break;
    }
    await askForKey(key);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // A body that is not JSON: describeError() falls back to the status.
  }
  if (!response.ok) {
    throw new ApiError(response.status, data);
  }
  return data;
}

function flash(message) {
  const box = byId("flash");
  box.textContent = message;
  box.hidden = !message;
}

// Milliseconds since the epoch of an ISO 8601 timestamp. The API sends up to
// six fraction digits, and Date.parse() is only specified for three.
function parseTime(iso) {
  return Date.parse(iso.replace(/(\.\d{3})\d+/, "$1"));
}

function formatTime(iso) {
  return iso ? new Date(parseTime(iso)).toLocaleString() : "";
}

function timeElement(iso) {
  return el("time", {dateTime: iso || "", textContent: formatTime(iso), title: iso || ""});
}

function formatPercent(value) {
  return `${Math.floor(value * 10) / 10} %`;
}

function statusBadge(task) {
  const badge = el("span", {className: `status status-${task.status}`, textContent: task.status});
  if (task.pending_request) {
    badge.append(el("small", {textContent: ` · ${task.pending_request.toLowerCase()} requested`}));
  }
  return badge;
}

function progressBar() {
  const fill = el("div", {className: "fill"});
  const label = el("span", {className: "label"});
  return el("div", {
    className: "progress",
    role: "progressbar",
    "aria-valuemin": "0",
    "aria-valuemax": "100",
  }, fill, label);
}

function updateProgressBar(bar, task) {
  const value = Math.max(0, Math.min(100, task.progress));
  bar.setAttribute("aria-valuenow", String(value));
  bar.dataset.status = task.status;
  bar.querySelector(".fill").style.width = `${value}%`;
  bar.querySelector(".label").textContent = formatPercent(value);
}

// The buttons for the actions that the task's status allows. A paused task
// accepts both start and resume; one button shows, named for what it does.
function actionButtons(task) {
  const allowed = new Set(task.allowed_actions);
  if (allowed.has("start") && allowed.has("resume")) {
    allowed.delete(task.attempts === 0 ? "resume" : "start");
  }
  const order = ["start", "resume", "pause", "stop", "restart"];
  return order.filter((action) => allowed.has(action)).map((action) =>
    el("button", {
      type: "button",
      className: `action action-${action}`,
      textContent: action[0].toUpperCase() + action.slice(1),
      "data-action": action,
      onclick: (event) => {
        event.stopPropagation();
        act(task.id, action, event.currentTarget);
      },
    }));
}

async function act(taskId, action, button) {
  button.disabled = true;
  try {
    const task = await api("POST", `tasks/${encodeURIComponent(taskId)}/${action}`);
    flash("");
    currentView.showTask(task);
  } catch (error) {
    flash(error.message);
    button.disabled = false;
  }
}

// A server-sent event stream that reports its state in the top bar and
// reopens itself after the server rejected it.
class LiveStream {
  static instances = new Set();

  // Reopen every stream at once, with the key that was just entered.
  static reopenAll() {
    for (const stream of LiveStream.instances) {
      clearTimeout(stream.timer);
      stream.source.close();
      stream.open();
    }
  }

  constructor(url, handlers, onOpen) {
    this.url = url;
    this.handlers = handlers;
    this.onOpen = onOpen;
    this.closed = false;
    LiveStream.instances.add(this);
    this.open();
  }

  open() {
    this.source = new EventSource(withKey(this.url));
    this.source.onopen = () => {
      setConnection("live", "Live");
      this.onOpen();
    };
    this.source.onerror = () => {
      if (this.source.readyState === EventSource.CLOSED) {
        setConnection("offline", "Offline, retrying");
        this.timer = setTimeout(() => this.open(), REOPEN_DELAY);
      } else {
        setConnection("offline", "Reconnecting");
      }
    };
    for (const [name, handler] of Object.entries(this.handlers)) {
      this.source.addEventListener(name, (event) => handler(JSON.parse(event.data)));
    }
  }

  close() {
    this.closed = true;
    LiveStream.instances.delete(this);
    clearTimeout(this.timer);
    this.source.close();
  }
}

function setConnection(state, text) {
  const indicator = byId("connection");
  indicator.dataset.state = state;
  indicator.textContent = text;
}

// -- the task list --

class ListView {
  constructor(query) {
    this.status = query.get("status") || "";
    this.name = query.get("name") || "";
    this.rows = new Map(); // task id -> {task, row}
    this.exhausted = false;
    byId("status-filter").value = this.status;
    byId("name-filter").value = this.name;
    byId("task-rows").replaceChildren();
    this.load();
    let first = true;
    this.stream = new LiveStream("tasks/stream", {
      counts: (counts) => this.showCounts(counts),
      task: (task) => this.showTask(task),
      reload: () => this.load(),
    }, () => {
      // After a reconnection, reload what changed while the stream was down.
      if (!first) {
        this.load();
      }
      first = false;
    });
  }

  close() {
    this.stream.close();
  }

  query(offset) {
    const params = new URLSearchParams({limit: String(PAGE_SIZE), offset: String(offset)});
    if (this.status) {
      params.set("status", this.status);
    }
    if (this.name) {
      params.set("name", this.name);
    }
    return `tasks?${params}`;
  }

  async load() {
    try {
      const tasks = await api("GET", this.query(0));
      this.rows.clear();
      byId("task-rows").replaceChildren();
      this.append(tasks);
    } catch (error) {
      flash(error.message);
    }
  }

  async loadMore() {
    try {
      this.append(await api("GET", this.query(this.rows.size)));
    } catch (error) {
      flash(error.message);
    }
  }

  append(tasks) {
    for (const task of tasks) {
      if (!this.rows.has(task.id)) {
        const row = this.buildRow(task);
        byId("task-rows").append(row);
        this.rows.set(task.id, {task, row});
      }
    }
    this.exhausted = tasks.length < PAGE_SIZE;
    byId("more").hidden = this.exhausted;
    byId("list-empty").hidden = this.rows.size > 0;
  }

  matches(task) {
    return (!this.status || task.status === this.status) && (!this.name || task.name === this.name);
  }

  // Apply a task from the stream or an action: update its row, or insert a
  // new matching task in created_at order within the loaded range.
  showTask(task) {
    const shown = this.rows.get(task.id);
    if (shown) {
      if (!isOlder(task, shown.task)) {
        shown.task = task;
        this.fillRow(shown.row, task);
      }
      return;
    }
    // In the order shown, which is the API's: newest created first.
    const loaded = [...byId("task-rows").children].map((row) => this.rows.get(row.dataset.taskId));
    const oldest = loaded.length ? loaded[loaded.length - 1].task : null;
    if (!this.matches(task) || (oldest && !this.exhausted && newerFirst(task, oldest) > 0)) {
      return;
    }
    const row = this.buildRow(task);
    const next = loaded.find((entry) => newerFirst(task, entry.task) < 0);
    byId("task-rows").insertBefore(row, next ? next.row : null);
    this.rows.set(task.id, {task, row});
    byId("list-empty").hidden = true;
  }

  showCounts(counts) {
    const total = Object.values(counts).reduce((sum, number) => sum + number, 0);
    const chip = (status, label, number) => el("button", {
      type: "button",
      className: `count count-${status || "ALL"}${status === this.status ? " selected" : ""}`,
      "data-status": status,
      onclick: () => navigateToList(status, this.name),
    }, el("span", {textContent: label}), el("strong", {textContent: String(number)}));
    byId("counts").replaceChildren(
      chip("", "All", total),
      ...STATUSES.map((status) => chip(status, status, counts[status] || 0)),
    );
  }

  buildRow(task) {
    const row = el("tr", {"data-task-id": task.id});
    const link = el("a", {href: `#/tasks/${encodeURIComponent(task.id)}`, textContent: task.name});
    row.append(
      el("td", {}, link, el("div", {className: "task-id", textContent: task.id.slice(0, 8)})),
      el("td", {className: "status-cell"}),
      el("td", {className: "progress-cell"}, progressBar()),
      el("td", {className: "message"}),
      el("td", {className: "created"}, timeElement(task.created_at)),
      el("td", {className: "actions-cell"}),
    );
    this.fillRow(row, task);
    return row;
  }

  fillRow(row, task) {
    row.querySelector(".status-cell").replaceChildren(statusBadge(task));
    updateProgressBar(row.querySelector(".progress"), task);
    const error = task.error ? `${task.error.type}: ${task.error.message}` : "";
    row.querySelector(".message").textContent = error || task.message || "";
    const actions = el("span", {className: "actions"}, ...actionButtons(task));
    row.querySelector(".actions-cell").replaceChildren(actions);
  }
}

// True if task a is an older version of task b. Timestamps are compared as
// dates: their text varies in the number of fraction digits.
function isOlder(a, b) {
  return parseTime(a.updated_at) < parseTime(b.updated_at);
}

// Order tasks as the API lists them: newest created first, then by id.
function newerFirst(a, b) {
  if (a.created_at !== b.created_at) {
    return parseTime(a.created_at) > parseTime(b.created_at) ? -1 : 1;
  }
  return a.id > b.id ? -1 : 1;
}

function navigateToList(status, name) {
  const params = new URLSearchParams();
  if (status) {
    params.set("status", status);
  }
  if (name) {
    params.set("name", name);
  }
  const search = params.toString();
  location.hash = search ? `#/?${search}` : "#/";
}

// -- one task --

class TaskView {
  constructor(taskId) {
    this.taskId = taskId;
    this.task = null;
    this.events = new Map(); // event id -> history event
    for (const id of ["task-name", "task-id", "task-message", "task-params", "task-history"]) {
      byId(id).replaceChildren();
    }
    byId("task-id").textContent = taskId;
    byId("task-progress").replaceChildren(progressBar());
    byId("task-status").replaceChildren();
    byId("task-actions").replaceChildren();
    byId("task-details").replaceChildren();
    byId("task-result-block").hidden = true;
    byId("task-error-block").hidden = true;
    const url = `tasks/${encodeURIComponent(taskId)}/stream`;
    this.stream = new LiveStream(url, {
      task: (task) => this.showTask(task),
      history: (events) => this.showHistory(events),
      unavailable: (body) => flash(body.detail),
    }, () => {});
    this.checkExists();
  }

  close() {
    this.stream.close();
  }

  // The stream cannot tell a missing task from a dropped connection.
  async checkExists() {
    try {
      this.showTask(await api("GET", `tasks/${encodeURIComponent(this.taskId)}`));
    } catch (error) {
      flash(error.message);
    }
  }

  showTask(task) {
    if (task.id !== this.taskId || (this.task && isOlder(task, this.task))) {
      return;
    }
    this.task = task;
    document.title = `${task.name} ${task.status} · taskmill`;
    byId("task-name").textContent = task.name;
    byId("task-status").replaceChildren(statusBadge(task));
    byId("task-actions").replaceChildren(...actionButtons(task));
    updateProgressBar(byId("task-progress").firstChild, task);
    byId("task-message").textContent = task.message || "";
    this.showDetails(task);
    const params = JSON.stringify(task.params, null, 2);
    if (byId("task-params").textContent !== params) {
      byId("task-params").textContent = params;
    }
    byId("task-result-block").hidden = task.result === null;
    byId("task-result").textContent = JSON.stringify(task.result, null, 2);
    this.showError(task.error);
  }

  showDetails(task) {
    const rows = [
      ["Attempts", String(task.attempts)],
      ["Failed runs", String(task.failures)],
      ["Recoveries", String(task.recoveries)],
      ["Runner", task.owner],
      ["Created", task.created_at && timeElement(task.created_at)],
      ["Started", task.started_at && timeElement(task.started_at)],
      ["Finished", task.finished_at && timeElement(task.finished_at)],
      ["Updated", timeElement(task.updated_at)],
      ["Last heartbeat", task.heartbeat_at && timeElement(task.heartbeat_at)],
      ["Lease expires", task.lease_expires_at && timeElement(task.lease_expires_at)],
      ["Retry after", task.run_after && timeElement(task.run_after)],
    ];
    byId("task-details").replaceChildren(...rows
      .filter(([, value]) => value)
      .flatMap(([term, value]) => [el("dt", {textContent: term}), el("dd", {}, value)]));
  }

  showError(error) {
    byId("task-error-block").hidden = !error;
    if (!error) {
      return;
    }
    byId("task-error").textContent = `${error.type}: ${error.message} (in ${error.phase})`;
    byId("task-traceback-block").hidden = !error.traceback;
    byId("task-traceback").textContent = error.traceback || "";
  }

  showHistory(events) {
    for (const event of events) {
      this.events.set(event.id, event);
    }
    const sorted = [...this.events.values()].sort((a, b) => a.id - b.id);
    byId("task-history").replaceChildren(...sorted.map((event) => historyEntry(event)));
  }
}

// A transition shows its statuses; a warning about the run changes none, so it
// shows the word "warning" instead.
function historyEntry(event) {
  const label = event.kind === "warning"
    ? el("span", {className: "transition"},
      el("span", {className: "status status-warning", textContent: "warning"}))
    : el("span", {className: "transition"},
      event.from_status ? el("span", {className: `status status-${event.from_status}`, textContent: event.from_status}) : null,
      event.from_status ? " → " : null,
      el("span", {className: `status status-${event.to_status}`, textContent: event.to_status}));
  return el("li", {className: event.kind === "warning" ? "warning" : ""},
    timeElement(event.at),
    label,
    el("p", {className: "reason", textContent: event.reason}));
}

// -- the form that creates a task --

class NewTaskView {
  constructor(query) {
    this.types = [];
    this.fields = [];
    this.preferred = query.get("type") || "";
    byId("new-error").hidden = true;
    this.load();
  }

  close() {}

  showTask() {}

  async load() {
    try {
      this.types = await api("GET", "task-types");
    } catch (error) {
      flash(error.message);
      return;
    }
    const select = byId("new-type");
    select.replaceChildren(...this.types.map((type) =>
      el("option", {value: type.name, textContent: type.name})));
    if (this.types.some((type) => type.name === this.preferred)) {
      select.value = this.preferred;
    }
    select.onchange = () => this.showFields();
    byId("new-form").onsubmit = (event) => {
      event.preventDefault();
      this.submit();
    };
    this.showFields();
  }

  showFields() {
    const type = this.types.find((item) => item.name === byId("new-type").value);
    const fieldset = byId("new-fields");
    fieldset.replaceChildren(el("legend", {textContent: "Params"}));
    byId("new-description").textContent = type ? type.description || "" : "";
    this.fields = type ? paramFields(type.params_schema) : [];
    for (const field of this.fields) {
      fieldset.append(field.element);
    }
    fieldset.hidden = this.fields.length === 0;
  }

  async submit() {
    const error = byId("new-error");
    error.hidden = true;
    const params = {};
    let valid = true;
    for (const field of this.fields) {
      field.setError("");
      try {
        const value = field.read();
        if (value !== undefined) {
          params[field.name] = value;
        }
      } catch (problem) {
        field.setError(problem.message);
        valid = false;
      }
    }
    if (!valid) {
      return;
    }
    const body = {name: byId("new-type").value, params, start: byId("new-start").checked};
    try {
      const task = await api("POST", "tasks", body);
      location.hash = `#/tasks/${encodeURIComponent(task.id)}`;
    } catch (problem) {
      this.showFieldErrors(problem.body);
      error.textContent = problem.message;
      error.hidden = false;
    }
  }

  // Put each 422 error next to its field: detail[].loc is ["body", "params", NAME, ...].
  showFieldErrors(body) {
    if (!body || !Array.isArray(body.detail)) {
      return;
    }
    for (const item of body.detail) {
      const field = this.fields.find((candidate) => candidate.name === item.loc[2]);
      if (field) {
        field.setError(item.msg);
      }
    }
  }
}

// Build one input per top-level property of a params JSON schema. Numbers,
// strings, booleans and enums get their own inputs; anything else is typed
// as JSON.
function paramFields(schema) {
  const required = new Set(schema.required || []);
  const properties = schema.properties || {};
  return Object.entries(properties).map(([name, property]) =>
    paramField(name, resolve(schema, property), required.has(name)));
}

// Follow a local "$ref", and unwrap "anyOf: [X, null]" (an optional X).
function resolve(schema, property) {
  let resolved = property;
  if (resolved.$ref && resolved.$ref.startsWith("#/$defs/")) {
    resolved = {...schema.$defs[resolved.$ref.slice("#/$defs/".length)], ...property};
    delete resolved.$ref;
  }
  if (Array.isArray(resolved.anyOf)) {
    const options = resolved.anyOf.filter((option) => option.type !== "null");
    if (options.length === 1) {
      resolved = {...resolve(schema, options[0]), ...resolved, nullable: true};
      delete resolved.anyOf;
    }
  }
  return resolved;
}

function paramField(name, property, required) {
  const id = `param-${name}`;
  let input;
  let read;
  const kind = property.enum ? "enum" : property.type;
  if (kind === "enum") {
    input = el("select", {id, name}, ...property.enum.map((value) =>
      el("option", {value: JSON.stringify(value), textContent: String(value)})));
    if (property.default !== undefined) {
      input.value = JSON.stringify(property.default);
    }
    read = () => JSON.parse(input.value);
  } else if (kind === "boolean") {
    input = el("input", {id, name, type: "checkbox", checked: property.default === true});
    read = () => input.checked;
  } else if (kind === "integer" || kind === "number") {
    input = el("input", {id, name, type: "number", step: kind === "integer" ? "1" : "any"});
    if (property.minimum !== undefined) {
      input.min = String(property.minimum);
    }
    if (property.maximum !== undefined) {
      input.max = String(property.maximum);
    }
    if (property.default !== undefined && property.default !== null) {
      input.value = String(property.default);
    }
    read = () => {
      if (input.value.trim() === "") {
        return blank(required, property);
      }
      const value = Number(input.value);
      if (!Number.isFinite(value) || (kind === "integer" && !Number.isInteger(value))) {
        throw new Error(`Enter ${kind === "integer" ? "a whole number" : "a number"}.`);
      }
      return value;
    };
  } else if (kind === "string") {
    input = el("input", {id, name, type: "text"});
    if (typeof property.default === "string") {
      input.value = property.default;
    }
    read = () => (input.value === "" ? blank(required, property) : input.value);
  } else {
    input = el("textarea", {id, name, rows: 3, placeholder: "JSON"});
    if (property.default !== undefined) {
      input.value = JSON.stringify(property.default);
    }
    read = () => {
      if (input.value.trim() === "") {
        return blank(required, property);
      }
      try {
        return JSON.parse(input.value);
      } catch {
        throw new Error("Enter valid JSON.");
      }
    };
  }
  const error = el("span", {className: "field-error", hidden: true});
  const help = property.description ? el("span", {className: "help", textContent: property.description}) : null;
  const label = el("label", {htmlFor: id, textContent: property.title || name});
  if (required) {
    label.append(el("span", {className: "required", textContent: " *", title: "required"}));
  }
  const element = el("div", {className: `field field-${kind || "json"}`}, label, input, help, error);
  return {
    name,
    element,
    read,
    setError(message) {
      error.textContent = message;
      error.hidden = !message;
      input.setAttribute("aria-invalid", message ? "true" : "false");
    },
  };
}

// The value of an empty input: leave it out so that the server applies its
// default or reports it missing, unless it may be null.
function blank(required, property) {
  return property.nullable && required ? null : undefined;
}

// -- views --

let currentView = null;

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, search] = hash.split("?");
  const query = new URLSearchParams(search || "");
  if (currentView) {
    currentView.close();
  }
  flash("");
  setConnection("", "");
  const match = path.match(/^\/tasks\/(.+)$/);
  let view = "list";
  if (match) {
    view = "task";
  } else if (path === "/new") {
    view = "new";
  }
  for (const name of ["list", "task", "new"]) {
    byId(`${name}-view`).hidden = name !== view;
  }
  document.title = "taskmill";
  if (view === "task") {
    currentView = new TaskView(decodeURIComponent(match[1]));
  } else if (view === "new") {
    currentView = new NewTaskView(query);
  } else {
    currentView = new ListView(query);
  }
}

async function loadTaskTypeNames() {
  try {
    const types = await api("GET", "task-types");
    byId("task-type-names").replaceChildren(...types.map((type) => el("option", {value: type.name})));
  } catch {
    // The list view reports the same failure when it loads.
  }
}

function setUp() {
  byId("status-filter").append(...STATUSES.map((status) =>
    el("option", {value: status, textContent: status})));
  byId("filters").onsubmit = (event) => event.preventDefault();
  byId("status-filter").onchange = () =>
    navigateToList(byId("status-filter").value, byId("name-filter").value.trim());
  byId("name-filter").onchange = () =>
    navigateToList(byId("status-filter").value, byId("name-filter").value.trim());
  byId("more").onclick = () => currentView.loadMore();
  window.addEventListener("hashchange", route);
  loadTaskTypeNames();
  route();
}

document.addEventListener("DOMContentLoaded", setUp);
