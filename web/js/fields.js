// One form control per param spec (see schema.js): build it, read it, write it, show its error.

const MAX_SEED = 2 ** 31 - 1;

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children);
  return node;
}

/** JSON with object keys sorted: the same value whatever order its keys came in. */
function canonical(value) {
  return JSON.stringify(value, (_key, item) =>
    item && typeof item === "object" && !Array.isArray(item)
      ? Object.fromEntries(Object.keys(item).sort().map((key) => [key, item[key]]))
      : item,
  );
}

/** Whether two param values are equal (as JSON, object keys in any order). */
export function same(a, b) {
  return canonical(a) === canonical(b);
}

function decimals(step) {
  const text = String(step ?? 1);
  return text.includes(".") ? text.split(".")[1].length : 0;
}

function numberOrNull(text, integer) {
  if (String(text).trim() === "") return null;
  const value = Number(text);
  if (!Number.isFinite(value)) return null;
  return integer ? Math.round(value) : value;
}

/** A field: {spec, root, control, read() -> {value} | {error}, write(value), setError(text)}. */
export function buildField(spec, onEdit) {
  const key = spec.key ?? spec.name;
  const id = `param-${key}`;
  const builder = BUILDERS[spec.widget] ?? BUILDERS.json;
  const parts = builder(spec, id, onEdit);
  const error = element("p", { class: "field-error", id: `${id}-error`, "data-testid": `error-${key}` });
  const help = spec.help ? element("p", { class: "field-help", id: `${id}-help`, text: spec.help }) : null;
  parts.control.setAttribute("aria-describedby", [help?.id, error.id].filter(Boolean).join(" "));
  // In a list's item the help is folded away (app.css): the label shows it on hover.
  const title = spec.nested && spec.help ? spec.help : undefined;
  const label = element("label", { for: parts.control.id, text: spec.label, title });
  const head = element("div", { class: "field-head" }, [label, ...(parts.head ?? [])]);
  // A list item's field is named by data-field; data-param marks the panel's own params.
  const dataset = spec.nested ? { field: spec.name } : { param: spec.name };
  const classes = ["field", `field-${spec.widget}`, spec.half ? "half" : ""].filter(Boolean).join(" ");
  const root = element("div", { class: classes, dataset }, [
    head,
    parts.body ?? parts.control,
    ...(help ? [help] : []),
    error,
  ]);
  return {
    spec,
    root,
    control: parts.control,
    read: parts.read,
    write: parts.write,
    setError(text) {
      error.textContent = text ?? "";
      root.classList.toggle("invalid", Boolean(text));
      parts.control.setAttribute("aria-invalid", text ? "true" : "false");
    },
  };
}

function textField(spec, id, onEdit) {
  const multiline = spec.widget === "textarea";
  const control = element(multiline ? "textarea" : "input", {
    id,
    type: multiline ? undefined : "text",
    rows: multiline ? spec.rows : undefined,
    placeholder: spec.placeholder || undefined,
    maxlength: spec.maxLength,
    spellcheck: "true",
    "data-testid": spec.testid,
  });
  // Live fields (the prompt) send as you type, after a pause; others when you leave or press Enter.
  if (spec.live) control.addEventListener("input", () => onEdit(spec.name, false));
  control.addEventListener("change", () => onEdit(spec.name, true));
  return {
    control,
    read: () => ({ value: control.value === "" && spec.nullable ? null : control.value }),
    write: (value) => {
      control.value = value === null || value === undefined ? "" : String(value);
    },
  };
}

function sliderField(spec, id, onEdit) {
  const control = element("input", {
    id,
    type: "range",
    min: spec.min,
    max: spec.max,
    step: spec.step,
    "data-testid": spec.testid,
  });
  const readout = element("output", { for: id, class: "readout" });
  const digits = decimals(spec.step);
  const show = () => {
    readout.textContent = Number(control.value).toFixed(digits);
  };
  control.addEventListener("input", () => {
    show();
    onEdit(spec.name, false);
  });
  control.addEventListener("change", () => onEdit(spec.name, true));
  return {
    control,
    head: [readout],
    read: () => ({ value: numberOrNull(control.value, spec.type === "integer") }),
    write: (value) => {
      control.value = String(value ?? spec.min);
      show();
    },
  };
}

function numberField(spec, id, onEdit) {
  const control = element("input", {
    id,
    type: "number",
    inputmode: spec.type === "integer" ? "numeric" : "decimal",
    min: spec.min,
    max: spec.max,
    step: spec.step ?? "any",
    "data-testid": spec.testid,
  });
  control.addEventListener("change", () => onEdit(spec.name, true));
  const read = () => {
    const value = numberOrNull(control.value, spec.type === "integer");
    if (value !== null || spec.nullable) return { value };
    return { error: "Enter a number." };
  };
  return { control, read, write: (value) => (control.value = value ?? "") };
}

function seedField(spec, id, onEdit) {
  const parts = numberField(spec, id, onEdit);
  const button = element("button", {
    type: "button",
    class: "ghost small",
    "data-testid": "new-seed",
    title: "Pick a random seed",
    text: "New seed",
  });
  button.addEventListener("click", () => {
    const high = Number.isFinite(spec.max) ? Math.min(spec.max, MAX_SEED) : MAX_SEED;
    const low = Number.isFinite(spec.min) ? spec.min : 0;
    parts.write(low + Math.floor(Math.random() * (high - low + 1)));
    onEdit(spec.name, true);
  });
  return { ...parts, body: element("div", { class: "inline" }, [parts.control, button]) };
}

function selectField(spec, id, onEdit) {
  const control = element(
    "select",
    { id, "data-testid": spec.testid },
    spec.enum.map((option) => element("option", { value: JSON.stringify(option), text: String(option) })),
  );
  control.addEventListener("change", () => onEdit(spec.name, true));
  return {
    control,
    read: () => ({ value: JSON.parse(control.value) }),
    write: (value) => (control.value = JSON.stringify(value)),
  };
}

function toggleField(spec, id, onEdit) {
  const control = element("input", { id, type: "checkbox", role: "switch", "data-testid": spec.testid });
  control.addEventListener("change", () => onEdit(spec.name, true));
  return {
    control,
    read: () => ({ value: control.checked }),
    write: (value) => (control.checked = Boolean(value)),
  };
}

function listField(spec, id, onEdit) {
  const integer = spec.items?.type === "integer";
  const control = element("input", {
    id,
    type: "text",
    inputmode: "numeric",
    placeholder: "e.g. 32, 45",
    "data-testid": spec.testid,
  });
  control.addEventListener("change", () => onEdit(spec.name, true));
  const read = () => {
    const items = control.value.split(/[\s,]+/).filter(Boolean);
    if (items.length === 0 && spec.nullable) return { value: null };
    const values = items.map((item) => numberOrNull(item, integer));
    if (values.some((value) => value === null)) return { error: "Enter numbers separated by commas." };
    return { value: values };
  };
  return { control, read, write: (value) => (control.value = (value ?? []).join(", ")) };
}

function jsonField(spec, id, onEdit) {
  const control = element("textarea", { id, rows: 2, class: "mono", "data-testid": spec.testid });
  control.addEventListener("change", () => onEdit(spec.name, true));
  const read = () => {
    try {
      return { value: JSON.parse(control.value) };
    } catch {
      return { error: "Enter a JSON value." };
    }
  };
  return { control, read, write: (value) => (control.value = JSON.stringify(value)) };
}

const BUILDERS = {
  text: textField,
  textarea: textField,
  slider: sliderField,
  number: numberField,
  seed: seedField,
  select: selectField,
  toggle: toggleField,
  list: listField,
  json: jsonField,
};

export { element };
