// The params panel: only the controls the running pipeline takes (read from its JSON schema),
// edits coalesced and debounced into one patch, the server's answer shown next to each control.

import { element, same } from "./fields.js";
import { buildControl } from "./objects.js";
import { GROUP_ORDER, fieldSpecs } from "./schema.js";

const STORAGE_PREFIX = "livediff.params.";
const OPEN_GROUPS = ["Style", "Style image", "Generation", "Control"];

/** Event "change" (detail: a patch object) after edits settle; ``values`` holds the current set. */
export class ParamsForm extends EventTarget {
  constructor(root, pipeline) {
    super();
    this.root = root;
    this.pipelineName = pipeline.name;
    this.defaults = pipeline.defaults ?? {};
    this.fields = new Map();
    this.pending = new Map();
    this.timer = null;
    this.values = { ...this.defaults, ...this._restore() };
    for (const spec of fieldSpecs(pipeline.params_schema)) {
      this.fields.set(spec.name, buildControl(spec, (name, commit) => this._edited(name, commit)));
    }
    this._render();
  }

  _render() {
    const groups = new Map(GROUP_ORDER.map((name) => [name, []]));
    for (const field of this.fields.values()) groups.get(field.spec.group).push(field.root);
    const used = [...groups].filter(([, roots]) => roots.length);
    // The creative controls stay open; output size, model and the rest fold away beneath them.
    const creative = used.some(([name]) => OPEN_GROUPS.includes(name));
    const sections = used.map(([name, roots]) =>
      element("details", { class: "group", open: !creative || OPEN_GROUPS.includes(name), dataset: { group: name } }, [
        element("summary", { text: name }),
        ...roots,
      ]),
    );
    this.root.replaceChildren(...sections);
    for (const [name, field] of this.fields) field.write(this.values[name]);
  }

  /** True when the pipeline takes this param (a control is shown for it). */
  has(name) {
    return this.fields.has(name);
  }

  /** Values the user changed from the pipeline's defaults: a new session starts with them. */
  changedFromDefaults() {
    return Object.fromEntries(
      Object.entries(this.values).filter(
        ([name, value]) => this.fields.has(name) && !same(value, this.defaults[name]),
      ),
    );
  }

  _edited(name, commit) {
    const field = this.fields.get(name);
    const read = field.read();
    if ("error" in read) {
      field.setError("");
      field.setError(read.error, read.path);
      this.pending.delete(name);
      return;
    }
    field.setError("");
    this.pending.set(name, read.value);
    if (field.spec.turnsOn && read.value) this._switchOn(field.spec.turnsOn);
    clearTimeout(this.timer);
    if (commit) this.flush();
    else this.timer = setTimeout(() => this.flush(), field.spec.debounceMs);
  }

  /** Switches the object param ``name`` on (its ``enabled``), in the same patch as the edit that
   * needs it (a style image turns the IP-Adapter on). */
  _switchOn(name) {
    const target = this.fields.get(name);
    const read = target?.read();
    if (!read || "error" in read || !read.value || typeof read.value !== "object") return;
    const value = { ...read.value, enabled: true };
    target.write(value, { force: true });
    this.pending.set(name, value);
  }

  /** The field that takes a file dropped on the page (the style image), or null. */
  fileField() {
    return [...this.fields.values()].find((field) => typeof field.takeFile === "function") ?? null;
  }

  /** Gives ``file`` to the field that takes files, shown open; false when there is none. */
  takeFile(file) {
    const field = this.fileField();
    if (!field) return false;
    const group = field.root.closest("details");
    if (group) group.open = true;
    field.root.scrollIntoView({ block: "nearest" });
    field.takeFile(file);
    return true;
  }

  /** Sends the edits waiting for their debounce now. */
  flush() {
    clearTimeout(this.timer);
    const patch = {};
    for (const [name, value] of this.pending) {
      if (!same(value, this.values[name])) patch[name] = value;
      this.values[name] = value;
    }
    this.pending.clear();
    if (Object.keys(patch).length === 0) return;
    this._save();
    this.dispatchEvent(new CustomEvent("change", { detail: patch }));
  }

  /** The params the server now applies: shown everywhere except in a control being edited. */
  applyServerParams(params) {
    for (const [name, value] of Object.entries(params)) {
      const field = this.fields.get(name);
      if (!field) continue;
      field.setError("");
      this.values[name] = value;
      const editing = field.editing ? field.editing() : document.activeElement === field.control;
      if (!this.pending.has(name) && !editing) field.write(value);
    }
    this._save();
  }

  /** Field errors [{field, path, message}] shown next to their controls (a list's item's error
   * next to that item's control); the rest are returned. */
  showErrors(errors) {
    const unplaced = [];
    for (const { field: name, path, message } of errors) {
      const field = this.fields.get(name);
      if (field) field.setError(message, path);
      else unplaced.push(name ? `${name}: ${message}` : message);
    }
    return unplaced;
  }

  /** Back to the pipeline's defaults (sent as one patch). */
  reset() {
    for (const [name, field] of this.fields) {
      field.setError("");
      const value = this.defaults[name];
      field.write(value, { force: true });
      if (!same(value, this.values[name])) this.pending.set(name, value);
    }
    this.flush();
  }

  _restore() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORAGE_PREFIX + this.pipelineName) || "{}");
      return saved && typeof saved === "object" ? saved : {};
    } catch {
      return {};
    }
  }

  _save() {
    try {
      localStorage.setItem(STORAGE_PREFIX + this.pipelineName, JSON.stringify(this.changedFromDefaults()));
    } catch {
      // Storage can be full or disabled; remembering the prompt is a convenience only.
    }
  }
}
