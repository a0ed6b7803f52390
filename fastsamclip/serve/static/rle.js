// COCO RLE ({"size": [h, w], "counts": string}) as the server sends masks: decoding, drawing, measuring.
// The counts string is pycocotools' (rleToString): run lengths, alternately 0s and 1s, in column-major
// (Fortran) pixel order, each written in 5-bit groups from character 48 up, a run after the second
// written as its difference from the run two before.
"use strict";

const RLE = {
  // Run lengths of a counts string (pycocotools' rleFrString).
  runs(counts) {
    const out = [];
    let p = 0;
    while (p < counts.length) {
      let x = 0, k = 0, more = 1, c = 0;
      while (more) {
        c = counts.charCodeAt(p) - 48;
        x |= (c & 0x1f) << (5 * k);
        more = c & 0x20;
        p++; k++;
        if (!more && (c & 0x10)) x |= -1 << (5 * k);
      }
      if (out.length > 2) x += out[out.length - 2];
      out.push(x);
    }
    return out;
  },

  // Calls fn(start, end) for each run of 1s, as pixel indices in column-major order.
  eachRun(rle, fn) {
    const runs = RLE.runs(rle.counts);
    let i = 0;
    for (let r = 0; r < runs.length; r++) {
      if (r % 2 === 1) fn(i, i + runs[r]);
      i += runs[r];
    }
  },

  // Paints the mask's pixels with [r, g, b, a] into RGBA data of a w x h image.
  paint(rle, data, color) {
    const [h, w] = rle.size;
    RLE.eachRun(rle, (a, b) => {
      for (let i = a; i < b; i++) {
        const o = ((i % h) * w + ((i / h) | 0)) * 4;
        data[o] = color[0]; data[o + 1] = color[1]; data[o + 2] = color[2]; data[o + 3] = color[3];
      }
    });
  },

  // Area and COCO bbox [x, y, width, height] of the mask.
  measure(rle) {
    const h = rle.size[0];
    let area = 0, x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1;
    RLE.eachRun(rle, (a, b) => {
      area += b - a;
      const ca = (a / h) | 0, cb = ((b - 1) / h) | 0;
      x0 = Math.min(x0, ca); x1 = Math.max(x1, cb);
      // One column: its rows; over a column boundary: down to the bottom, then again from the top.
      if (ca === cb) { y0 = Math.min(y0, a % h); y1 = Math.max(y1, (b - 1) % h); } else { y0 = 0; y1 = h - 1; }
    });
    if (area === 0) return {area: 0, bbox: [0, 0, 0, 0]};
    return {area, bbox: [x0, y0, x1 - x0 + 1, y1 - y0 + 1]};
  },
};
