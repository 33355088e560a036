// A param that is a dict of numbers (e.g. lora_dict, {id: weight}): one row per key, its id and
// its weight (slider and number box), Remove, Add, and the whole dict sent as one value.

import { element, same } from "./fields.js";
import { icon, REMOVE_ICON } from "./entries.js";

const isObject = (value) => Boolean(value) && typeof value === "object" && !Array.isArray(value);

function decimals(step) {
  const text = String(step ?? 1);
  return text.includes(".") ? text.split(".")[1].length : 0;
}

/** The field (same shape as buildField's) for a "dict" spec. */
export function buildDict(spec, onEdit) {
  return new DictField(spec, onEdit);
}

/**
 * Its value is {key: number} of the rows with an id (null, where allowed, when there are none);
 * a row without an id stays on the page only ("not sent yet"). Errors take a path inside the
 * dict, [key, ...], shown at that key's row.
 */
class DictField {
  constructor(spec, onEdit) {
    this.spec = spec;
    this.onEdit = onEdit;
    this.key = spec.key ?? spec.name;
    this.rows = [];
    const id = `param-${this.key}`;
    const title = element("span", { class: "field-title", id: `${id}-label`, text: spec.label });
    this.count = element("span", { class: "readout", "data-testid": `count-${this.key}` });
    this.list = element("div", { class: "pairs" });
    this.add = element(
      "button",
      { type: "button", id, class: "ghost small add-entry", "data-testid": `add-${this.key}` },
      [element("span", { "aria-hidden": "true", text: "+" }), spec.addLabel],
    );
    this.add.addEventListener("click", () => this.addRow());
    this.error = element("p", { class: "field-error", id: `${id}-error`, "data-testid": `error-${this.key}` });
    const help = spec.help ? element("p", { class: "field-help", id: `${id}-help`, text: spec.help }) : null;
    this.add.setAttribute("aria-describedby", [help?.id, this.error.id].filter(Boolean).join(" "));
    const head = element("div", { class: "field-head" }, [title, this.count]);
    const dataset = spec.nested ? { field: spec.name } : { param: spec.name };
    this.root = element(
      "div",
      { class: "field field-dict", role: "group", "aria-labelledby": title.id, dataset },
      [head, ...(help ? [help] : []), this.list, this.add, this.error],
    );
    this.control = this.add;
    this._update();
  }

  // -- the field interface controls.js uses -----------------------------------------------------
  read() {
    const value = {};
    for (const row of this.rows) {
      const name = row.name.value.trim();
      if (!name) continue;
      if (name in value) return { error: "Listed twice: remove one.", path: [name] };
      const weight = this._weight(row);
      if (weight === null) return { error: "Enter a number.", path: [name] };
      value[name] = weight;
    }
    this._update();
    if (Object.keys(value).length === 0 && this.spec.nullable) return { value: null };
    return { value };
  }

  /** Shows ``value`` ({key: number}); the rows without an id stay unless ``force`` (a reset). */
  write(value, { force = false } = {}) {
    const dict = isObject(value) ? value : {};
    const now = this.read();
    if (!force && !now.error && same(now.value ?? {}, dict)) return;
    const drafts = force ? [] : this.rows.filter((row) => !row.name.value.trim());
    const kept = drafts.map((row) => ["", this._weight(row) ?? this._start()]);
    this._rebuild([...Object.entries(dict), ...kept]);
  }

  /** An error at ``path`` ([key, ...]); no text clears them all. */
  setError(text, path = []) {
    if (!text) return this._clearErrors();
    const [name] = path;
    const row = this.rows.find((candidate) => candidate.name.value.trim() === String(name));
    if (!row) {
      this.root.classList.add("invalid");
      this.error.textContent = name === undefined ? text : `${name}: ${text}`;
      return;
    }
    row.root.classList.add("invalid");
    row.error.textContent = text;
    for (const control of [row.name, row.slider, row.number]) control.setAttribute("aria-invalid", "true");
  }

  /** Not rewritten by the server while the user is in it. */
  editing() {
    return this.root.contains(document.activeElement);
  }

  // -- Add and Remove -----------------------------------------------------------------------------
  addRow() {
    if (this._full()) return;
    const row = this._row("", this._start(), this.rows.length);
    this.rows.push(row);
    this.list.append(row.root);
    this._update();
    row.name.focus();
  }

  removeRow(row) {
    const index = this.rows.indexOf(row);
    const rest = this.rows.filter((other) => other !== row);
    this._rebuild(rest.map((other) => [other.name.value, this._weight(other) ?? this._start()]));
    const next = this.rows[index] ?? this.rows[index - 1];
    (next ? next.remove : this.add).focus();
    this.onEdit(this.spec.name, true);
  }

  // -- rows -------------------------------------------------------------------------------------
  _row(name, weight, index) {
    const prefix = `${this.key}-${index}`;
    const label = `${this.spec.itemLabel} ${index + 1}`;
    const { values } = this.spec;
    const row = {};
    row.error = element("p", { class: "field-error", id: `param-${prefix}-error`, "data-testid": `error-${prefix}` });
    const described = row.error.id;
    row.name = element("input", {
      type: "text",
      class: "pair-name",
      "aria-label": `${label}: id`,
      "aria-describedby": described,
      placeholder: this.spec.placeholder || undefined,
      maxlength: this.spec.keyMaxLength,
      spellcheck: "false",
      "data-testid": `param-${prefix}-key`,
    });
    const bounds = { min: values.min, max: values.max, step: values.step ?? "any" };
    row.slider = element("input", {
      type: "range",
      ...bounds,
      "aria-label": `${label}: weight`,
      "aria-describedby": described,
      "data-testid": `param-${prefix}-weight`,
    });
    row.number = element("input", {
      type: "number",
      inputmode: "decimal",
      ...bounds,
      class: "pair-number",
      "aria-label": `${label}: weight (number)`,
      "aria-describedby": described,
      "data-testid": `param-${prefix}-value`,
    });
    row.remove = element(
      "button",
      {
        type: "button",
        class: "icon-button ghost small entry-remove",
        title: `Remove ${label}`,
        "aria-label": `Remove ${label}`,
        "data-testid": `remove-${prefix}`,
      },
      [icon(REMOVE_ICON)],
    );
    row.note = element("p", {
      class: "field-help entry-note",
      "data-testid": `note-${prefix}`,
      text: "Not sent yet: enter its id.",
    });
    row.root = element("div", { class: "pair", role: "group", "aria-label": label, "data-testid": `pair-${prefix}` }, [
      element("div", { class: "pair-line" }, [row.name, row.remove]),
      element("div", { class: "pair-line" }, [row.slider, row.number]),
      row.note,
      row.error,
    ]);
    row.name.value = name;
    this._show(row, weight);
    this._listen(row);
    return row;
  }

  _listen(row) {
    row.remove.addEventListener("click", () => this.removeRow(row));
    row.name.addEventListener("change", () => this.onEdit(this.spec.name, true));
    row.name.addEventListener("input", () => this._update());
    row.slider.addEventListener("input", () => {
      row.number.value = Number(row.slider.value).toFixed(decimals(this.spec.values.step));
      this.onEdit(this.spec.name, false);
    });
    row.slider.addEventListener("change", () => this.onEdit(this.spec.name, true));
    row.number.addEventListener("change", () => {
      const weight = this._weight(row);
      if (weight !== null) row.slider.value = String(weight);
      this.onEdit(this.spec.name, true);
    });
  }

  _show(row, weight) {
    row.slider.value = String(weight);
    row.number.value = String(weight);
  }

  /** The row's weight (its number box, which follows the slider), or null if not a number. */
  _weight(row) {
    const text = row.number.value.trim();
    const weight = text === "" ? Number.NaN : Number(text);
    if (!Number.isFinite(weight)) return null;
    return this.spec.values.type === "integer" ? Math.round(weight) : weight;
  }

  _start() {
    const { values } = this.spec;
    if (values.default !== undefined) return values.default;
    if (values.min <= 1 && values.max >= 1) return 1;
    return values.min ?? 0;
  }

  _rebuild(pairs) {
    this.rows = pairs.map(([name, weight], index) => this._row(name, weight, index));
    this.list.replaceChildren(...this.rows.map((row) => row.root));
    this._update();
  }

  _full() {
    return Number.isInteger(this.spec.maxItems) && this.rows.length >= this.spec.maxItems;
  }

  _update() {
    const max = this.spec.maxItems;
    const count = this.rows.length;
    this.count.textContent = Number.isInteger(max) ? `${count} of ${max}` : String(count);
    this.add.disabled = this._full();
    this.add.title = this._full() ? `At most ${max}` : "";
    for (const row of this.rows) row.note.hidden = Boolean(row.name.value.trim());
  }

  _clearErrors() {
    this.root.classList.remove("invalid");
    this.error.textContent = "";
    for (const row of this.rows) {
      row.root.classList.remove("invalid");
      row.error.textContent = "";
      for (const control of [row.name, row.slider, row.number]) control.setAttribute("aria-invalid", "false");
    }
  }
}
