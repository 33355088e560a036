// Reading the pipeline's params JSON schema (pydantic's output) into one control spec per field.

/** Presentation hints for params livediff's pipelines are known to take. */
export const HINTS = {
  prompt: {
    label: "Prompt",
    widget: "textarea",
    rows: 3,
    group: "Style",
    order: 0,
    debounceMs: 350,
    live: true,
    placeholder: "a watercolor portrait, soft morning light",
    testid: "prompt",
  },
  negative_prompt: {
    label: "Negative prompt",
    widget: "textarea",
    rows: 2,
    group: "Style",
    order: 1,
    debounceMs: 400,
    live: true,
    placeholder: "blurry, low quality",
  },
  strength: { label: "Strength", group: "Generation", order: 10, min: 0, max: 1, step: 0.01 },
  num_inference_steps: { label: "Steps", group: "Generation", order: 11, min: 1, max: 4 },
  steps: { label: "Steps", group: "Generation", order: 11, min: 1, max: 4 },
  t_index_list: { label: "Denoising steps", group: "Generation", order: 12 },
  guidance_scale: { label: "Guidance", group: "Generation", order: 13, min: 0, max: 10, step: 0.1 },
  delta: { label: "Delta", group: "Generation", order: 14, min: 0, max: 1, step: 0.01 },
  cfg_type: { label: "CFG", group: "Generation", order: 15 },
  seed: { label: "Seed", widget: "seed", group: "Generation", order: 16 },
  similarity_threshold: {
    label: "Skip similar frames",
    group: "Generation",
    order: 17,
    min: 0,
    max: 1,
    step: 0.01,
  },
  width: { label: "Output width", widget: "number", group: "Output", order: 30 },
  height: { label: "Output height", widget: "number", group: "Output", order: 31 },
  delay_ms: { label: "Simulated model delay (ms)", group: "Output", order: 32, step: 10 },
  model: { label: "Model", group: "Model", order: 40, help: "Hub id or folder; changing it reloads." },
  vae: { label: "VAE", group: "Model", order: 41 },
};

export const GROUP_ORDER = ["Style", "Generation", "Output", "Model", "More"];
const SIMPLE_TYPES = new Set(["string", "number", "integer", "boolean", "array"]);

function follow(node, root) {
  let current = node ?? {};
  for (let depth = 0; depth < 8; depth += 1) {
    if (current.$ref) {
      const path = current.$ref.replace(/^#\//, "").split("/");
      current = { ...path.reduce((at, key) => at?.[key], root), ...withoutKey(current, "$ref") };
    } else if (current.allOf?.length === 1) {
      current = { ...follow(current.allOf[0], root), ...withoutKey(current, "allOf") };
    } else {
      return current;
    }
  }
  return current;
}

function withoutKey(object, key) {
  const { [key]: _dropped, ...rest } = object;
  return rest;
}

/** The branch of a union the page can edit (the first simple one), and whether null is allowed. */
function simplest(node, root) {
  const resolved = follow(node, root);
  const branches = resolved.anyOf ?? resolved.oneOf;
  if (!branches) return { ...resolved, nullable: false };
  const options = branches.map((branch) => follow(branch, root));
  const nullable = options.some((option) => option.type === "null");
  const chosen = options.find((option) => option.enum || SIMPLE_TYPES.has(option.type));
  const meta = withoutKey(withoutKey(resolved, "anyOf"), "oneOf");
  return { ...(chosen ?? { type: "json" }), ...meta, nullable, union: options.length > 1 + nullable };
}

function widgetFor(spec) {
  if (spec.enum) return "select";
  if (spec.type === "boolean") return "toggle";
  if (spec.type === "string") return "text";
  if (spec.type === "array" && ["number", "integer"].includes(spec.items?.type)) return "list";
  if (spec.type === "number" || spec.type === "integer") {
    return Number.isFinite(spec.min) && Number.isFinite(spec.max) ? "slider" : "number";
  }
  return "json";
}

const finite = (value) => (Number.isFinite(value) ? value : undefined);

/** {min, max, step} a control offers: the schema's bounds (an exclusive one moved in by a
 * step), else the hint's; the step is multipleOf, the hint's, 1 for integers or 1/100 of the range. */
function range(type, hint) {
  const low = type.minimum ?? type.exclusiveMinimum ?? hint.min;
  const high = type.maximum ?? type.exclusiveMaximum ?? hint.max;
  let step = type.multipleOf ?? hint.step ?? (type.type === "integer" ? 1 : undefined);
  if (step === undefined && Number.isFinite(low) && Number.isFinite(high)) step = (high - low) / 100;
  const min = type.exclusiveMinimum === undefined ? low : low + (step ?? 0);
  const max = type.exclusiveMaximum === undefined ? high : high - (step ?? 0);
  return { min: finite(min), max: finite(max), step };
}

/** The hinted widget where it suits the field's type, else what the type calls for. */
function chooseWidget(spec, hinted) {
  if (hinted === "seed" && spec.type === "integer") return "seed";
  if (hinted === "number" && !spec.enum && ["number", "integer"].includes(spec.type)) return "number";
  if (hinted === "textarea" && spec.type === "string" && !spec.enum) return "textarea";
  return widgetFor(spec);
}

/** One control spec per editable param, ordered by hint, then schema order. */
export function fieldSpecs(schema) {
  const properties = schema?.properties ?? {};
  const specs = Object.entries(properties).map(([name, node], index) => {
    const type = simplest(node, schema);
    const hint = HINTS[name] ?? {};
    const spec = {
      name,
      type: type.type,
      enum: type.enum ?? null,
      items: type.items ? follow(type.items, schema) : null,
      nullable: type.nullable,
      union: Boolean(type.union),
      maxLength: type.maxLength,
      label: hint.label ?? type.title ?? name,
      help: hint.help ?? type.description ?? "",
      group: hint.group ?? "More",
      order: hint.order ?? 100 + index,
      rows: hint.rows ?? 2,
      debounceMs: hint.debounceMs ?? 150,
      placeholder: hint.placeholder ?? "",
      testid: hint.testid ?? `param-${name}`,
      live: Boolean(hint.live),
    };
    Object.assign(spec, range(type, hint));
    spec.widget = chooseWidget(spec, hint.widget);
    return spec;
  });
  return specs.sort((a, b) => a.order - b.order);
}
