// A param that is an object with its own schema (e.g. cached_attention, a processing block): a
// small card of controls built from its fields like the panel's own, the whole object one value.

import { buildDict } from "./dicts.js";
import { buildEntries } from "./entries.js";
import { buildField, element } from "./fields.js";
import { buildImage } from "./images.js";
import { scoped, startValue } from "./schema.js";

/** The field (same shape as buildField's) for any spec: a list of objects, an object, a dict of
 * numbers, an image, or one control. */
export function buildControl(spec, onEdit) {
  if (spec.widget === "entries") return buildEntries(spec, onEdit);
  if (spec.widget === "dict") return buildDict(spec, onEdit);
  if (spec.widget === "image") return buildImage(spec, onEdit);
  if (spec.widget === "object") return new ObjectField(spec, onEdit);
  return buildField(spec, onEdit);
}

const isObject = (value) => Boolean(value) && typeof value === "object" && !Array.isArray(value);

/**
 * Its value is the object of its fields' values (keys it has no control for kept as they came);
 * errors take a path inside it, [field, ...the path inside that field].
 */
class ObjectField {
  constructor(spec, onEdit) {
    this.spec = spec;
    this.onEdit = onEdit;
    this.key = spec.key ?? spec.name;
    this.extra = {};
    const id = `param-${this.key}`;
    const title = element("span", { class: "field-title", id: `${id}-label`, text: spec.label });
    const head = element("div", { class: "object-head" }, [title]);
    this.body = element("div", { class: "object-body" });
    this.fields = new Map();
    for (const fieldSpec of spec.fields) {
      const field = buildControl(scoped(fieldSpec, this.key), (_name, commit) => this._edited(commit));
      this.fields.set(fieldSpec.name, field);
      (fieldSpec.inHead ? head : this.body).append(field.root);
    }
    this.error = element("p", { class: "field-error", id: `${id}-error`, "data-testid": `error-${this.key}` });
    const help = spec.help ? element("p", { class: "field-help", id: `${id}-help`, text: spec.help }) : null;
    const dataset = spec.nested ? { field: spec.name } : { param: spec.name };
    const attributes = { class: "field field-object", role: "group", "aria-labelledby": title.id, dataset };
    this.root = element("div", { ...attributes, "data-testid": `object-${this.key}` }, [
      head,
      ...(help ? [help] : []),
      this.body,
      this.error,
    ]);
    this.control = this.fields.values().next().value?.control ?? this.root;
  }

  // -- the field interface controls.js uses -----------------------------------------------------
  read() {
    const value = { ...this.extra };
    for (const [name, field] of this.fields) {
      const read = field.read();
      if ("error" in read) return { error: read.error, path: [name, ...(read.path ?? [])] };
      value[name] = read.value;
    }
    return { value };
  }

  /** Shows ``value`` control by control: not into a focused one, unless ``force`` (a reset). */
  write(value, options = {}) {
    const object = isObject(value) ? value : {};
    this.extra = Object.fromEntries(Object.entries(object).filter(([name]) => !this.fields.has(name)));
    for (const [name, field] of this.fields) {
      const focused = !field.editing && document.activeElement === field.control;
      if (focused && !options.force) continue;
      field.write(name in object ? object[name] : startValue(field.spec), options);
    }
    this._update();
  }

  /** An error at ``path`` ([field, ...]); no text clears them all. */
  setError(text, path = []) {
    if (!text) return this._clearErrors();
    const [name, ...rest] = path;
    const field = this.fields.get(name);
    if (field) return field.setError(text, rest);
    this.root.classList.add("invalid");
    this.error.textContent = name === undefined ? text : `${path.join(".")}: ${text}`;
  }

  /** Server values are written control by control, never into the one being edited. */
  editing() {
    return false;
  }

  _edited(commit) {
    this._update();
    this.onEdit(this.spec.name, commit);
  }

  /** Switched off by its own switch (e.g. Enabled): the other controls are dimmed, kept. */
  _update() {
    const off = [...this.fields.values()].some((field) => field.spec.enables && field.read().value === false);
    this.root.classList.toggle("off", off);
  }

  _clearErrors() {
    this.root.classList.remove("invalid");
    this.error.textContent = "";
    for (const field of this.fields.values()) field.setError("");
  }
}
