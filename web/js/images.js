// A param that is an image's address (e.g. ip_adapter_style_image_url): a drop zone with a
// thumbnail, a file picker, and a box for an http(s) address. A dropped or chosen file is read
// in the browser, made at most MAX_SIDE pixels on its longest side, and sent as a JPEG data URL.

import { element } from "./fields.js";

export const MAX_SIDE = 512;
const JPEG_QUALITY = 0.9;
const ADDRESS = /^(https?:\/\/\S+|data:image\/[\w.+-]+;base64,)/i;

/** The field (same shape as buildField's) for an "image" spec; ``takeFile(file)`` takes a file. */
export function buildImage(spec, onEdit) {
  return new ImageField(spec, onEdit);
}

/** {url, width, height}: ``file`` drawn at most MAX_SIDE on its longest side, as a JPEG data URL. */
export async function shrink(file, maxSide = MAX_SIDE) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, maxSide / Math.max(bitmap.width, bitmap.height));
  const width = Math.max(1, Math.round(bitmap.width * scale));
  const height = Math.max(1, Math.round(bitmap.height * scale));
  const canvas = element("canvas", { width, height });
  const context = canvas.getContext("2d");
  // JPEG has no transparency: a transparent picture is laid on white, not black.
  context.fillStyle = "#fff";
  context.fillRect(0, 0, width, height);
  context.drawImage(bitmap, 0, 0, width, height);
  bitmap.close();
  return { url: canvas.toDataURL("image/jpeg", JPEG_QUALITY), width, height };
}

function kilobytes(text) {
  return `${Math.max(1, Math.round((text.length * 3) / 4 / 1024))} KB`;
}

/**
 * Its value is the address in the box, else the data URL of the image taken from a file (empty:
 * null where allowed, else ""). A file that is not an image is refused here, nothing sent.
 */
class ImageField {
  constructor(spec, onEdit) {
    this.spec = spec;
    this.onEdit = onEdit;
    this.key = spec.key ?? spec.name;
    this.dropped = null;
    const id = `param-${this.key}`;
    this.control = element("input", {
      id,
      type: "url",
      inputmode: "url",
      placeholder: spec.placeholder || undefined,
      spellcheck: "false",
      "data-testid": spec.testid,
    });
    this.control.addEventListener("change", () => this._typed());
    this.picker = element("input", {
      type: "file",
      accept: "image/*",
      hidden: true,
      tabindex: "-1",
      "data-testid": `file-${this.key}`,
    });
    this.picker.addEventListener("change", () => this._picked());
    this.thumb = element("img", { class: "thumb", alt: "", hidden: true, "data-testid": `thumb-${this.key}` });
    this.caption = element("p", { class: "drop-text", "data-testid": `caption-${this.key}` });
    this.zone = this._zone(id);
    this.error = element("p", { class: "field-error", id: `${id}-error`, "data-testid": `error-${this.key}` });
    const help = spec.help ? element("p", { class: "field-help", id: `${id}-help`, text: spec.help }) : null;
    this.control.setAttribute("aria-describedby", [help?.id, this.error.id].filter(Boolean).join(" "));
    const label = element("label", { for: id, text: spec.label });
    const dataset = spec.nested ? { field: spec.name } : { param: spec.name };
    this.root = element("div", { class: "field field-image", dataset }, [
      element("div", { class: "field-head" }, [label]),
      this.zone,
      this.control,
      ...(help ? [help] : []),
      this.error,
    ]);
    this._show();
  }

  _zone(id) {
    const choose = element("button", {
      type: "button",
      class: "ghost small",
      "aria-describedby": `${id}-error`,
      "data-testid": `pick-${this.key}`,
      text: "Choose image…",
    });
    choose.addEventListener("click", () => this.picker.click());
    this.clear = element("button", {
      type: "button",
      class: "ghost small",
      "data-testid": `clear-${this.key}`,
      text: "Remove",
    });
    this.clear.addEventListener("click", () => this._cleared());
    const zone = element("div", { class: "drop-zone", "data-testid": `drop-${this.key}` }, [
      this.thumb,
      this.caption,
      element("div", { class: "inline" }, [choose, this.clear]),
      this.picker,
    ]);
    zone.addEventListener("dragover", (event) => this._dragOver(event));
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => this._drop(event));
    return zone;
  }

  // -- the field interface controls.js uses -----------------------------------------------------
  read() {
    const text = this.control.value.trim();
    if (text && !ADDRESS.test(text)) return { error: "Enter an http(s) address of an image, or drop one." };
    return { value: text || this.dropped || this._empty() };
  }

  write(value) {
    const url = typeof value === "string" ? value : "";
    this.dropped = url.startsWith("data:") ? url : null;
    this.control.value = this.dropped ? "" : url;
    this._show();
  }

  setError(text) {
    this.error.textContent = text ?? "";
    this.root.classList.toggle("invalid", Boolean(text));
    this.control.setAttribute("aria-invalid", text ? "true" : "false");
  }

  editing() {
    return document.activeElement === this.control;
  }

  /** Reads an image file into the field and sends it; a file that is not an image is refused. */
  async takeFile(file) {
    if (!file || !file.type.startsWith("image/")) {
      this.setError(`${file?.name || "That file"} is not an image: use a JPEG, PNG or WebP picture.`);
      return false;
    }
    this.setError("");
    this.caption.textContent = `Reading ${file.name}…`;
    let image;
    try {
      image = await shrink(file);
    } catch {
      this.setError(`${file.name} could not be read as an image.`);
      this._show();
      return false;
    }
    if (Number.isInteger(this.spec.maxLength) && image.url.length > this.spec.maxLength) {
      this.setError(`${file.name} is too large even at ${MAX_SIDE} px.`);
      this._show();
      return false;
    }
    this.dropped = image.url;
    this.control.value = "";
    this._show(`${file.name}, ${image.width} × ${image.height}`);
    this.onEdit(this.spec.name, true);
    return true;
  }

  // -- events -----------------------------------------------------------------------------------
  _dragOver(event) {
    if (!event.dataTransfer?.types.includes("Files")) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    this.zone.classList.add("dragging");
  }

  _drop(event) {
    this.zone.classList.remove("dragging");
    const file = event.dataTransfer?.files?.[0];
    if (!file) return;
    // Taken here: the page's own drop handler (app.js) sees defaultPrevented and leaves it.
    event.preventDefault();
    this.takeFile(file);
  }

  _picked() {
    const file = this.picker.files?.[0];
    this.picker.value = "";
    if (file) this.takeFile(file);
  }

  _typed() {
    this.dropped = null;
    this._show();
    this.onEdit(this.spec.name, true);
  }

  _cleared() {
    this.dropped = null;
    this.control.value = "";
    this.setError("");
    this._show();
    this.onEdit(this.spec.name, true);
  }

  _empty() {
    return this.spec.nullable ? null : "";
  }

  /** The thumbnail of the current image and a line about it. */
  _show(caption) {
    const read = this.read();
    const url = "error" in read ? null : read.value;
    this.thumb.hidden = !url;
    if (url) this.thumb.src = url;
    else this.thumb.removeAttribute("src");
    this.thumb.alt = url ? `${this.spec.label}: the current image` : "";
    this.clear.hidden = !url;
    if (caption) this.caption.textContent = caption;
    else if (this.dropped && url === this.dropped) this.caption.textContent = `Image from a file (${kilobytes(url)})`;
    else if (url) this.caption.textContent = "Image from the address below";
    else this.caption.textContent = "Drop an image here, or anywhere on the page";
  }
}
