// A param that is a list of objects (e.g. controlnets): one card per item, its controls built
// from the item's schema like the panel's own, Add and Remove, and the whole list as one value.

import { buildField, element, same } from "./fields.js";
import { scoped, startValue } from "./schema.js";

const SVG = "http://www.w3.org/2000/svg";
export const REMOVE_ICON = "M9 3h6l1 2h4v2H4V5h4l1-2zM6 9h12l-1 12H7L6 9zm4 2v8h1.5v-8H10zm2.5 0v8H14v-8h-1.5z";

/** An inline SVG icon of one path (aria-hidden). */
export function icon(path) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const shape = document.createElementNS(SVG, "path");
  shape.setAttribute("d", path);
  svg.append(shape);
  return svg;
}

function showText(node, text) {
  node.textContent = text ?? "";
}

const empty = (value) => value === "" || value === null || value === undefined;

/** The line where the errors about ``key`` (e.g. controlnets-0) are shown. */
function errorLine(key) {
  return element("p", { class: "field-error", id: `param-${key}-error`, "data-testid": `error-${key}` });
}

/**
 * The field (same shape as buildField's) for an "entries" spec. Its value is the list of the
 * complete items; an item just added stays on the page only ("not sent yet") until its required
 * fields are filled in, so the server never sees half an item. Errors take a path inside the
 * list, [index, field, key], index counting the items sent (the server's numbering).
 */
export function buildEntries(spec, onEdit) {
  return new EntryList(spec, onEdit);
}

class EntryList {
  constructor(spec, onEdit) {
    this.spec = spec;
    this.onEdit = onEdit;
    this.key = spec.key ?? spec.name;
    this.cards = [];
    this.sent = [];
    const id = `param-${this.key}`;
    const title = element("span", { class: "field-title", id: `${id}-label`, text: spec.label });
    this.count = element("span", { class: "readout", "data-testid": `count-${this.key}` });
    this.list = element("div", { class: "entries" });
    this.add = element(
      "button",
      { type: "button", id, class: "ghost small add-entry", "data-testid": `add-${this.key}` },
      [element("span", { "aria-hidden": "true", text: "+" }), spec.item.addLabel],
    );
    this.add.addEventListener("click", () => this.addEntry());
    this.error = errorLine(this.key);
    const help = spec.help ? element("p", { class: "field-help", id: `${id}-help`, text: spec.help }) : null;
    this.add.setAttribute("aria-describedby", [help?.id, this.error.id].filter(Boolean).join(" "));
    const head = element("div", { class: "field-head" }, [title, this.count]);
    // A list inside an object param (e.g. a block's processors) is named by data-field.
    const dataset = spec.nested ? { field: spec.name } : { param: spec.name };
    this.root = element(
      "div",
      { class: "field field-entries", role: "group", "aria-labelledby": title.id, dataset },
      [head, ...(help ? [help] : []), this.list, this.add, this.error],
    );
    this.control = this.add;
    this._update();
  }

  // -- the field interface controls.js uses -----------------------------------------------------
  read() {
    const result = this._collect(true);
    this.sent = result.sent;
    this._update();
    if (result.error) return { error: result.error, path: result.path };
    return { value: result.value };
  }

  /** Shows ``value`` (a list of items); ``force`` also drops the items not sent yet. */
  write(value, { force = false } = {}) {
    const list = Array.isArray(value) ? value : [];
    const now = this._collect(false);
    if (!force && !now.error && same(now.value, list)) return;
    const placed = this.cards.filter((card) => !card.draft);
    const drafts = force ? [] : this.cards.filter((card) => card.draft);
    if (placed.length === list.length && drafts.length === this.cards.length - placed.length) {
      placed.forEach((card, index) => this._fill(card, list[index]));
      this.sent = placed;
      this._update();
      return;
    }
    const kept = drafts.map((card) => ({ item: this._readCard(card, true).item, draft: true }));
    this._rebuild([...list.map((item) => ({ item, draft: false })), ...kept]);
  }

  /** An error at ``path`` ([index, field, key] in the sent list); no text clears them all. */
  setError(text, path = []) {
    if (!text) return this._clearErrors();
    const [index, name, key] = path;
    const card = Number.isInteger(index) ? this.sent[index] : null;
    if (!card) return showText(this.error, text);
    card.root.classList.add("invalid");
    const field = card.fields.get(name);
    if (field) return field.setError(text);
    const variant = card.variant;
    if (variant && name === variant.spec.name) {
      const target = variant.fields.get(key) ?? variant.json;
      if (target) return target.setError(text);
      return showText(variant.error, key === undefined ? text : `${key}: ${text}`);
    }
    showText(card.error, name === undefined ? text : `${name}: ${text}`);
  }

  /** Server values are written control by control, never into the one being edited. */
  editing() {
    return false;
  }

  // -- Add and Remove -----------------------------------------------------------------------------
  addEntry() {
    if (this._full()) return;
    const item = Object.fromEntries(this.spec.item.fields.map((field) => [field.name, startValue(field)]));
    const card = this._card(item, true, this.cards.length);
    this.cards.push(card);
    this.list.append(card.root);
    this._update();
    const fields = [...card.fields.values()];
    const first = fields.find((field) => field.spec.required && empty(field.read().value)) ?? fields[0];
    first?.control.focus();
    this.onEdit(this.spec.name, true);
  }

  removeEntry(card) {
    const index = this.cards.indexOf(card);
    const rest = this.cards
      .filter((other) => other !== card)
      .map((other) => ({ item: this._readCard(other, true).item, draft: other.draft }));
    this._rebuild(rest);
    // Keyboard users stay where they were: on the next item's Remove, else the previous, else Add.
    const next = this.cards[index] ?? this.cards[index - 1];
    (next ? next.remove : this.add).focus();
    this.onEdit(this.spec.name, true);
  }

  // -- cards ------------------------------------------------------------------------------------
  _card(item, draft, index) {
    const prefix = `${this.key}-${index}`;
    const name = `${this.spec.item.label} ${index + 1}`;
    const card = { draft, fields: new Map(), variant: null };
    const title = element("span", { class: "entry-title", id: `param-${prefix}-title`, text: name });
    card.remove = element(
      "button",
      {
        type: "button",
        class: "icon-button ghost small entry-remove",
        title: `Remove ${name}`,
        "aria-label": `Remove ${name}`,
        "data-testid": `remove-${prefix}`,
      },
      [icon(REMOVE_ICON)],
    );
    card.remove.addEventListener("click", () => this.removeEntry(card));
    const head = element("div", { class: "entry-head" }, [title]);
    const body = element("div", { class: "entry-body" });
    for (const fieldSpec of this.spec.item.fields) {
      const spec = scoped(fieldSpec, prefix);
      if (spec.widget === "variants") {
        const section = element("div", { class: "entry-variant", role: "group", "aria-label": spec.label });
        card.variant = { spec, section, which: undefined, fields: new Map(), json: null, extra: {} };
        body.append(section);
        continue;
      }
      const field = buildField(spec, (edited, commit) => this._edited(card, edited, commit));
      card.fields.set(spec.name, field);
      (spec.inHead ? head : body).append(field.root);
    }
    head.append(card.remove);
    const required = this.spec.item.fields.filter((field) => field.required).map((field) => field.label);
    card.note = element("p", {
      class: "field-help entry-note",
      id: `param-${prefix}-note`,
      "data-testid": `note-${prefix}`,
      text: `Not sent yet: fill in its ${required.join(" and ").toLowerCase()}.`,
    });
    card.error = errorLine(prefix);
    card.root = element(
      "div",
      { class: "entry", role: "group", "aria-labelledby": title.id, "data-testid": `entry-${prefix}` },
      [head, body, card.error],
    );
    // The "not sent yet" note sits under the first required control, which it also describes.
    const first = [...card.fields.values()].find((field) => field.spec.required && !field.spec.inHead);
    if (first) {
      first.root.after(card.note);
      const described = first.control.getAttribute("aria-describedby");
      first.control.setAttribute("aria-describedby", `${described} ${card.note.id}`.trim());
    } else {
      card.error.before(card.note);
    }
    this._fill(card, item);
    return card;
  }

  /** Writes ``item`` into the card's controls (not into a focused one). */
  _fill(card, item) {
    for (const [name, field] of card.fields) {
      if (document.activeElement === field.control) continue;
      field.write(name in item ? item[name] : startValue(field.spec));
    }
    const variant = card.variant;
    if (!variant) return;
    const by = card.fields.get(variant.spec.by);
    const which = by ? by.read().value : undefined;
    const values = item[variant.spec.name] ?? {};
    if (which !== variant.which) return this._renderVariant(card, which, values);
    if (variant.json) {
      if (document.activeElement !== variant.json.control) variant.json.write(values);
      return;
    }
    variant.extra = {};
    for (const [key, value] of Object.entries(values)) {
      const field = variant.fields.get(key);
      if (!field) variant.extra[key] = value;
      else if (document.activeElement !== field.control) field.write(value);
    }
  }

  /** The controls of the card's variant part for ``which`` (e.g. the canny thresholds). */
  _renderVariant(card, which, values) {
    const variant = card.variant;
    const { spec } = variant;
    const known = spec.variants[which];
    variant.which = which;
    variant.fields = new Map();
    variant.json = null;
    variant.extra = {};
    variant.error = errorLine(spec.key);
    const onEdit = (name, commit) => this._edited(card, name, commit);
    const children = [];
    if (!known) {
      // A variant the page has no hints for: its params as a JSON object.
      variant.json = buildField({ ...spec, widget: "json" }, onEdit);
      variant.json.write(values);
      children.push(variant.json.root);
    } else {
      if (known.help) children.push(element("p", { class: "field-help", text: known.help }));
      for (const fieldSpec of known.fields) {
        const field = buildField(scoped(fieldSpec, spec.key), onEdit);
        field.write(fieldSpec.name in values ? values[fieldSpec.name] : startValue(fieldSpec));
        variant.fields.set(fieldSpec.name, field);
        children.push(field.root);
      }
      for (const [key, value] of Object.entries(values)) {
        if (!variant.fields.has(key)) variant.extra[key] = value;
      }
    }
    // A JSON box shows its own errors; the other variants have one line for the whole object.
    variant.section.replaceChildren(...children, ...(variant.json ? [] : [variant.error]));
  }

  _edited(card, name, commit) {
    const variant = card.variant;
    // Another preprocessor takes other params: start them at its own defaults.
    if (variant && name === variant.spec.by) {
      this._renderVariant(card, card.fields.get(name).read().value, {});
    }
    this.onEdit(this.spec.name, commit);
  }

  /** {item} or {error, path: [field, key]}; ``lenient`` takes a start value for a bad one. */
  _readCard(card, lenient = false) {
    const item = {};
    const take = (field, path) => {
      const read = field.read();
      if (!("error" in read)) return read.value;
      if (lenient) return startValue(field.spec);
      throw Object.assign(new Error(read.error), { path });
    };
    try {
      for (const [name, field] of card.fields) item[name] = take(field, [name]);
      const variant = card.variant;
      if (variant) {
        if (variant.json) {
          item[variant.spec.name] = take(variant.json, [variant.spec.name]);
        } else {
          const values = { ...variant.extra };
          for (const [key, field] of variant.fields) values[key] = take(field, [variant.spec.name, key]);
          item[variant.spec.name] = values;
        }
      }
    } catch (error) {
      if (!error.path) throw error;
      return { error: error.message, path: error.path };
    }
    return { item };
  }

  _missing(card, item) {
    return this.spec.item.fields.filter((field) => field.required && empty(item[field.name]));
  }

  /** The list of complete items, or the first error; ``promote`` marks filled-in new items sent. */
  _collect(promote) {
    const sent = [];
    const value = [];
    for (const card of this.cards) {
      const read = this._readCard(card);
      if (read.error) {
        sent.push(card);
        return { sent, error: read.error, path: [sent.length - 1, ...read.path] };
      }
      const missing = this._missing(card, read.item);
      if (card.draft && missing.length) continue;
      if (promote) card.draft = false;
      sent.push(card);
      if (missing.length) {
        const [first] = missing;
        return { sent, error: `Enter the ${first.label.toLowerCase()}.`, path: [sent.length - 1, first.name] };
      }
      value.push(read.item);
    }
    return { sent, value };
  }

  _rebuild(entries) {
    this.cards = entries.map(({ item, draft }, index) => this._card(item, draft, index));
    this.list.replaceChildren(...this.cards.map((card) => card.root));
    this.sent = this.cards.filter((card) => !card.draft);
    this._update();
  }

  _full() {
    return Number.isInteger(this.spec.maxItems) && this.cards.length >= this.spec.maxItems;
  }

  _update() {
    const max = this.spec.maxItems;
    const count = this.cards.length;
    showText(this.count, Number.isInteger(max) ? `${count} of ${max}` : String(count));
    this.add.disabled = this._full();
    this.add.title = this._full() ? `At most ${max}` : "";
    for (const card of this.cards) {
      const item = this._readCard(card, true).item;
      card.note.hidden = !(card.draft && this._missing(card, item).length);
      // An item switched off by its own switch (e.g. Enabled) is dimmed, its values kept.
      const off = [...card.fields.values()].some((field) => field.spec.enables && !item[field.spec.name]);
      card.root.classList.toggle("off", off);
    }
  }

  _clearErrors() {
    showText(this.error, "");
    for (const card of this.cards) {
      card.root.classList.remove("invalid");
      showText(card.error, "");
      for (const field of card.fields.values()) field.setError("");
      const variant = card.variant;
      if (!variant) continue;
      showText(variant.error, "");
      variant.json?.setError("");
      for (const field of variant.fields.values()) field.setError("");
    }
  }
}
