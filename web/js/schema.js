// Reading the pipeline's params JSON schema (pydantic's output) into one control spec per field.

/**
 * The params each ControlNet preprocessor takes, as small JSON schemas (the server's schema
 * leaves ``preprocessor_params`` an open object and checks it by the chosen preprocessor).
 * A preprocessor missing here gets a JSON box.
 */
const PREPROCESSOR_PARAMS = {
  canny: {
    description:
      "Canny edges of each frame steer the picture: weaker edges below Low go, edges above High stay.",
    properties: {
      low_threshold: { type: "number", title: "Low", minimum: 0, maximum: 255, default: 100 },
      high_threshold: { type: "number", title: "High", minimum: 0, maximum: 255, default: 200 },
    },
    hints: { low_threshold: { step: 1, half: true }, high_threshold: { step: 1, half: true } },
  },
  depth: {
    description: "A depth map of each frame (near is bright) steers the picture.",
    properties: {
      detect_resolution: {
        type: "integer",
        title: "Detect resolution",
        minimum: 140,
        maximum: 1036,
        multipleOf: 14,
        default: 518,
      },
    },
  },
  passthrough: {
    description: "Each frame is the control image as it is (for a stream of ready-made maps).",
    properties: {},
  },
  temporal_net: {
    description: "The previous output frame is the control image (TemporalNet).",
    properties: {},
  },
  temporal_net_tensorrt: {
    description: "TemporalNet2: the previous output and the input's optical flow (6 channels).",
    properties: {
      flow_strength: { type: "number", title: "Flow strength", minimum: 0, maximum: 2, default: 1.0 },
    },
    hints: { flow_strength: { step: 0.05 } },
  },
};

const FEEDBACK_STRENGTH = {
  properties: {
    feedback_strength: { type: "number", title: "Feedback strength", minimum: 0, maximum: 1, default: 0.5 },
  },
  hints: { feedback_strength: { step: 0.01 } },
};

/** The params each processor type of a processing block takes (checked server-side by type,
 * like the preprocessor params above). A type missing here gets a JSON box. */
const PROCESSOR_PARAMS = {
  feedback: { description: "Blends the previous output image in: (1 - s) now + s previous.", ...FEEDBACK_STRENGTH },
  latent_feedback: {
    description: "Blends the previous output latent in: (1 - s) now + s previous.",
    ...FEEDBACK_STRENGTH,
  },
};

/** Hints of a processing block (an Enabled switch and its list of processors). */
function processing(label, order, help) {
  return {
    label,
    help,
    group: "Temporal",
    order,
    fields: {
      enabled: { label: "Enabled", order: 0, inHead: true, enables: true },
      processors: {
        label: "Processors",
        order: 1,
        itemLabel: "Processor",
        addLabel: "Add processor",
        items: {
          type: { label: "Type", order: 0 },
          params: { label: "Settings", widget: "variants", by: "type", order: 1, variants: PROCESSOR_PARAMS },
          enabled: { label: "Enabled", order: 2, inHead: true, enables: true },
        },
      },
    },
  };
}

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
  controlnets: {
    label: "ControlNets",
    group: "Control",
    order: 20,
    itemLabel: "ControlNet",
    addLabel: "Add ControlNet",
    items: {
      model_id: { label: "Model", order: 0, placeholder: "hub id or folder" },
      preprocessor: { label: "Preprocessor", order: 1 },
      preprocessor_params: {
        label: "Preprocessor settings",
        widget: "variants",
        by: "preprocessor",
        order: 2,
        variants: PREPROCESSOR_PARAMS,
      },
      conditioning_scale: { label: "Conditioning scale", order: 3, step: 0.05 },
      control_guidance_start: { label: "Starts at", order: 4, step: 0.01, half: true },
      control_guidance_end: { label: "Ends at", order: 5, step: 0.01, half: true },
      enabled: { label: "Enabled", order: 6, inHead: true, enables: true },
    },
  },
  cached_attention: {
    label: "Feature bank",
    help: "Self-attention also looks at earlier frames (StreamV2V's cached attention): steadier output.",
    group: "Temporal",
    order: 50,
    fields: {
      enabled: { label: "Enabled", order: 0, inHead: true, enables: true },
      max_frames: { label: "Frames remembered", order: 1, half: true },
      interval: { label: "Refresh every (frames)", widget: "number", order: 2, half: true },
    },
  },
  motion_noise: {
    label: "Motion-aware noise",
    help: "The first step's strength follows how much the input moves, from still to moving.",
    group: "Temporal",
    order: 51,
    fields: {
      enabled: { label: "Enabled", order: 0, inHead: true, enables: true },
      min_strength: { label: "Still strength", order: 1, step: 0.01, half: true },
      max_strength: { label: "Moving strength", order: 2, step: 0.01, half: true },
      sensitivity: { label: "Sensitivity", widget: "number", order: 3, step: 0.5, half: true },
      smoothing: { label: "Smoothing", order: 4, step: 0.01, half: true },
    },
  },
  do_add_noise: { label: "Re-noise between steps", group: "Temporal", order: 52 },
  image_preprocessing: processing(
    "Image preprocessing",
    53,
    "On the input frame before encoding: feedback blends the previous output in.",
  ),
  latent_preprocessing: processing(
    "Latent preprocessing",
    54,
    "On the input latent before noising: latent feedback blends the previous output latent in.",
  ),
  latent_postprocessing: processing(
    "Latent postprocessing",
    55,
    "On the denoised latent before decoding: latent feedback blends the previous one in.",
  ),
  image_postprocessing: processing(
    "Image postprocessing",
    56,
    "On the output frame: feedback blends the previous output in.",
  ),
  prompt_clears_history: { label: "New prompt clears history", group: "Temporal", order: 57 },
  width: { label: "Output width", widget: "number", group: "Output", order: 30 },
  height: { label: "Output height", widget: "number", group: "Output", order: 31 },
  delay_ms: { label: "Simulated model delay (ms)", group: "Output", order: 32, step: 10 },
  model: { label: "Model", group: "Models", order: 40, help: "Hub id or folder; changing it reloads." },
  vae: { label: "VAE", group: "Models", order: 41 },
  lora_dict: {
    label: "LoRAs",
    group: "Models",
    order: 42,
    step: 0.05,
    itemLabel: "LoRA",
    addLabel: "Add LoRA",
    placeholder: "hub id, file or folder",
    help: "Fused into the model, up to 8, each with its weight (-5 to 5); weights change live.",
  },
  use_lcm_lora: { label: "Add the LCM-LoRA", group: "Models", order: 43 },
  lcm_lora_id: { label: "LCM-LoRA", group: "Models", order: 44, placeholder: "hub id, file or folder" },
  ip_adapter: {
    label: "IP-Adapter",
    help: "The style image steers the picture alongside the prompt.",
    group: "Style image",
    order: 60,
    fields: {
      enabled: { label: "Enabled", order: 0, inHead: true, enables: true },
      type: { label: "Kind", order: 1, half: true },
      scale: { label: "Scale", order: 2, step: 0.01, half: true },
      weight_type: { label: "Weight type", order: 3 },
      ipadapter_model_path: { label: "Adapter model", order: 4, placeholder: "hub id or folder" },
    },
  },
  ip_adapter_style_image_url: {
    label: "Style image",
    widget: "image",
    group: "Style image",
    order: 61,
    turnsOn: "ip_adapter",
    placeholder: "https://… (or drop an image)",
    help: "Drop an image anywhere on the page, choose a file, or paste an http(s) address.",
  },
  use_safety_checker: { label: "Safety filter", group: "Safety", order: 70 },
  safety_checker_threshold: { label: "Threshold", group: "Safety", order: 71, step: 0.01 },
};

export const GROUP_ORDER = [
  "Style",
  "Style image",
  "Generation",
  "Control",
  "Temporal",
  "Output",
  "Models",
  "Safety",
  "More",
];
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
  const chosen =
    options.find((option) => option.enum || SIMPLE_TYPES.has(option.type)) ??
    options.find((option) => option.type === "object");
  const meta = withoutKey(withoutKey(resolved, "anyOf"), "oneOf");
  return { ...(chosen ?? { type: "json" }), ...meta, nullable, union: options.length > 1 + nullable };
}

function widgetFor(spec) {
  if (spec.enum) return "select";
  if (spec.type === "boolean") return "toggle";
  if (spec.type === "string") return "text";
  if (spec.type === "array" && ["number", "integer"].includes(spec.items?.type)) return "list";
  if (spec.type === "array" && spec.items?.type === "object" && spec.items.properties) return "entries";
  if (spec.type === "object" && spec.fields) return "object";
  if (spec.type === "object" && spec.values) return "dict";
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
  if (hinted === "variants" && spec.type === "object" && spec.variants) return "variants";
  if (hinted === "image" && spec.type === "string" && !spec.enum) return "image";
  return widgetFor(spec);
}

/**
 * One control spec per editable param, ordered by hint, then schema order. ``root`` is the schema
 * that $refs point into (the params schema, for a nested object's fields too); ``hints`` the
 * presentation table for this level (a list's item fields take their list's ``items`` hints).
 */
export function fieldSpecs(schema, { root = schema, hints = HINTS } = {}) {
  const properties = schema?.properties ?? {};
  const required = new Set(schema?.required ?? []);
  const specs = Object.entries(properties).map(([name, node], index) => {
    const type = simplest(node, root);
    const hint = hints[name] ?? {};
    const spec = {
      name,
      key: name,
      type: type.type,
      enum: type.enum ?? (type.const === undefined ? null : [type.const]),
      items: type.items ? follow(type.items, root) : null,
      nullable: type.nullable,
      union: Boolean(type.union),
      required: required.has(name),
      default: type.default,
      maxLength: type.maxLength,
      maxItems: type.maxItems ?? type.maxProperties,
      label: hint.label ?? type.title ?? name,
      help: hint.help ?? type.description ?? "",
      group: hint.group ?? "More",
      order: hint.order ?? 100 + index,
      rows: hint.rows ?? 2,
      debounceMs: hint.debounceMs ?? 150,
      placeholder: hint.placeholder ?? "",
      testid: hint.testid ?? `param-${name}`,
      live: Boolean(hint.live),
      half: Boolean(hint.half),
      inHead: Boolean(hint.inHead),
      enables: Boolean(hint.enables),
      turnsOn: hint.turnsOn ?? null,
    };
    Object.assign(spec, range(type, hint));
    if (hint.variants) Object.assign(spec, variantSpecs(hint, root));
    if (spec.type === "array" && spec.items?.type === "object" && spec.items.properties) {
      spec.item = itemSpec(spec.items, hint, root);
    }
    // An object with its own schema (e.g. cached_attention): its fields, built like the panel's.
    if (spec.type === "object" && type.properties) spec.fields = fieldSpecs(type, { root, hints: hint.fields ?? {} });
    // A dict of numbers (e.g. lora_dict, {id: weight}): the spec of its keys and of its values.
    if (spec.type === "object" && !type.properties) Object.assign(spec, dictSpec(type, hint, root));
    spec.widget = chooseWidget(spec, hint.widget);
    return spec;
  });
  return specs.sort((a, b) => a.order - b.order);
}

/** What a list of objects needs: its item's field specs (with their defaults) and its names. */
function itemSpec(items, hint, root) {
  const fields = fieldSpecs(items, { root, hints: hint.items ?? {} });
  return {
    fields,
    label: hint.itemLabel ?? items.title ?? "Item",
    addLabel: hint.addLabel ?? `Add ${(hint.itemLabel ?? items.title ?? "item").toLowerCase()}`,
  };
}

/** What a dict of numbers needs: its values' spec (a number control's) and its rows' names. */
function dictSpec(type, hint, root) {
  const values = type.additionalProperties ? follow(type.additionalProperties, root) : null;
  if (!values || !["number", "integer"].includes(values.type)) return {};
  const label = hint.itemLabel ?? "Entry";
  return {
    values: { type: values.type, default: values.default, ...range(values, hint) },
    keyMaxLength: type.propertyNames?.maxLength,
    itemLabel: label,
    addLabel: hint.addLabel ?? `Add ${label.toLowerCase()}`,
  };
}

/** An object param whose keys depend on a sibling's value (``hint.by``): specs per value. */
function variantSpecs(hint, root) {
  const variants = Object.fromEntries(
    Object.entries(hint.variants).map(([value, variant]) => [
      value,
      { help: variant.description ?? "", fields: fieldSpecs(variant, { root, hints: variant.hints ?? {} }) },
    ]),
  );
  return { by: hint.by, variants };
}

/** The value a new item starts with for ``spec``: its default, else an empty one of its type. */
export function startValue(spec) {
  if (spec.default !== undefined) return structuredClone(spec.default);
  if (spec.enum) return spec.enum[0];
  if (spec.type === "boolean") return false;
  if (spec.type === "string") return spec.nullable ? null : "";
  if (spec.type === "number" || spec.type === "integer") return spec.min ?? 0;
  if (spec.type === "array") return [];
  if (spec.fields) return Object.fromEntries(spec.fields.map((field) => [field.name, startValue(field)]));
  if (spec.type === "object") return {};
  return null;
}

/** ``spec`` for one item of a list: ids and test ids under ``prefix`` (e.g. controlnets-0). */
export function scoped(spec, prefix) {
  const key = `${prefix}-${spec.name}`;
  return { ...spec, key, testid: `param-${key}`, nested: true };
}
