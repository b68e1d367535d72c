// The page of `dmx serve` driven in a real headless browser (Debian's chromium through playwright-core): generate
// from a prompt, check the progress bar and a refused value, cancel a long run, send the picture to the edit panel,
// paint a mask with mouse drags, inpaint and (where the server has /dmx/v1/generate) run a blended edit, and check
// each new picture differs from the first. ctest runs it (label browser); exit 77 = skipped (no chromium or no
// tests/browser/node_modules: scripts/setup.sh installs both).
//
//   node tests/browser/serve_page.mjs BUILD/dmx MODELS_DIR ARTIFACTS_DIR
//
// Screenshots go to ARTIFACTS_DIR; DMX_UPDATE_SCREENSHOT=1 also writes docs/serve-page.png (the README's picture).
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const SKIP = 77;
const started = Date.now();
const log = (...a) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s]`, ...a);
const [dmx, models, outDir] = process.argv.slice(2);
if (!dmx || !models || !outDir) {
  console.error("usage: node serve_page.mjs DMX MODELS_DIR ARTIFACTS_DIR");
  process.exit(2);
}
const chromiumPath = process.env.DMX_CHROMIUM || "/usr/bin/chromium";
if (!fs.existsSync(chromiumPath)) {
  console.log(`SKIP: no chromium at ${chromiumPath} (scripts/setup.sh installs Debian's chromium; ` +
              "DMX_CHROMIUM names another)");
  process.exit(SKIP);
}
let chromium;
try {
  ({ chromium } = await import("playwright-core"));
} catch (e) {
  console.log("SKIP: playwright-core is not installed: run scripts/setup.sh (npm ci in tests/browser)");
  process.exit(SKIP);
}

// ---- the server: started here, stopped whatever happens -----------------------------------------------------

let server = null;
let serverLog = "";
function stopServer() {
  if (server && server.exitCode === null && server.signalCode === null) server.kill("SIGTERM");
}
async function waitServerExit() {
  if (!server || server.exitCode !== null || server.signalCode !== null) return;
  const exited = new Promise((resolve) => server.once("exit", resolve));
  const timer = setTimeout(() => server.kill("SIGKILL"), 5000);
  await exited;
  clearTimeout(timer);
}
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(sig, () => {
    stopServer();
    process.exit(1);
  });
}
process.on("exit", stopServer);
// A hard limit below ctest's TIMEOUT, so that the server is stopped by us and never left behind.
const deadline = setTimeout(() => {
  console.error("FAIL: the test ran past 100 s");
  stopServer();
  process.exit(1);
}, 100000);
deadline.unref();

function startServer() {
  return new Promise((resolve, reject) => {
    server = spawn(dmx, ["serve", "--port", "0", "--models", models], { stdio: ["ignore", "pipe", "pipe"] });
    const timer = setTimeout(() => reject(new Error("dmx serve did not say where it listens within 60 s")), 60000);
    server.stdout.on("data", (d) => {
      serverLog += d;
      const m = /listening on (http:\/\/[^\s]+)/.exec(serverLog);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    server.stderr.on("data", (d) => (serverLog += d));
    server.on("error", (e) => reject(e));
    server.on("exit", (code, sig) => reject(new Error(`dmx serve exited (${code ?? sig}) before listening`)));
  });
}

// ---- checks -----------------------------------------------------------------------------------------------------

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
  log("ok:", what);
}

// Clicks a run button and waits for its job's end: "LABEL: done", "LABEL: interrupted" or a visible error; fails
// when the server reports ignored fields.
async function runJob(page, button, label, timeout = 30000) {
  const before = await page.locator("#gallery figure").count();
  await page.click(button);
  await page.waitForFunction(
    (label) => {
      const s = document.getElementById("status");
      return s.className === "error" || s.textContent.startsWith(label + ": done") ||
             s.textContent.startsWith(label + ": interrupted");
    }, label, { timeout });
  const text = await page.textContent("#status");
  const error = (await page.getAttribute("#status", "class")) === "error";
  // The page must send only fields the server honours (a job's info lists the others).
  if (/\(ignored: /.test(text)) throw new Error(`the server ignored fields the page sent: "${text}"`);
  return { text, error, added: (await page.locator("#gallery figure").count()) - before };
}

// How two pictures differ, drawn on a canvas in the page at the first one's size: the number of pixels that
// differ, and the mean difference (0..255) inside and outside the edit panel's mask.
async function compare(page, a, b) {
  return page.evaluate(([a, b]) => {
    const load = (src) => new Promise((ok, fail) => {
      const i = new Image();
      i.onload = () => ok(i);
      i.onerror = fail;
      i.src = src;
    });
    return Promise.all([load(a), load(b)]).then(([x, y]) => {
      const c = document.createElement("canvas");
      c.width = x.naturalWidth;
      c.height = x.naturalHeight;
      const g = c.getContext("2d");
      g.drawImage(x, 0, 0);
      const dx = g.getImageData(0, 0, c.width, c.height).data;
      g.clearRect(0, 0, c.width, c.height);
      g.drawImage(y, 0, 0, c.width, c.height);
      const dy = g.getImageData(0, 0, c.width, c.height).data;
      const m = maskCanvas();
      const dm = m.getContext("2d").getImageData(0, 0, m.width, m.height).data;
      const sameSize = m.width === c.width && m.height === c.height;
      let n = 0, inSum = 0, inN = 0, outSum = 0, outN = 0;
      for (let i = 0; i < dx.length; i += 4) {
        const d = (Math.abs(dx[i] - dy[i]) + Math.abs(dx[i + 1] - dy[i + 1]) + Math.abs(dx[i + 2] - dy[i + 2])) / 3;
        if (d > 2) n++;
        if (sameSize && dm[i] > 127) {
          inSum += d;
          inN++;
        } else {
          outSum += d;
          outN++;
        }
      }
      return { pixels: n, inside: inN ? inSum / inN : 0, outside: outN ? outSum / outN : 0 };
    });
  }, [a, b]);
}

const newestPicture = (page) => page.getAttribute("#gallery figure:first-child img", "src");

async function main(browser, url) {
  const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  page.on("console", (m) => { if (m.type() === "error") log("page console:", m.text()); });
  fs.mkdirSync(outDir, { recursive: true });
  const shot = async (name) => {
    const file = path.join(outDir, name);
    await page.screenshot({ path: file, fullPage: true });
    log("screenshot", file);
  };

  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("model").options.length > 0, null, { timeout: 10000 });
  check(pageErrors.length === 0, "the page loads without script errors " + pageErrors.join("; "));
  const dmxEndpoints = await page.evaluate(async () => Object.keys((await (await fetch("/openapi.json")).json())
                                                                       .paths));
  const hasGenerate = dmxEndpoints.includes("/dmx/v1/generate");

  // A refused value is shown, with the server's detail naming the field.
  await page.fill("#steps", "5000");
  let r = await runJob(page, "#generate", "txt2img");
  check(r.error && /steps/.test(r.text) && /1000/.test(r.text), `a bad steps value is shown as an error: "${r.text}"`);

  // A long run: the progress bar moves, the preview appears, Cancel stops it.
  await page.fill("#prompt", "a smiling face with sunglasses");
  await page.fill("#steps", "400");
  await page.fill("#width", "32");
  await page.fill("#height", "32");
  await page.fill("#seed", "7");
  await page.click("#generate");
  await page.waitForFunction(() => {
    const v = document.getElementById("progress").value;
    return v > 0 && v < 1;
  }, null, { timeout: 20000 });
  const progress = await page.evaluate(() => document.getElementById("progress").value);
  check(progress > 0 && progress < 1, `the progress bar moves during a run (${progress.toFixed(3)})`);
  await page.waitForFunction(() => document.getElementById("preview").getAttribute("src"), null, { timeout: 10000 });
  check(true, "the step preview is shown");
  await page.click("#cancel");
  await page.waitForFunction(() => /interrupted/.test(document.getElementById("status").textContent), null,
                             { timeout: 20000 });
  check(true, "Cancel interrupts the run: " + (await page.textContent("#status")));

  // Generate a picture.
  await page.fill("#steps", "4");
  await page.fill("#cfg_scale", "3");
  r = await runJob(page, "#generate", "txt2img");
  check(!r.error && r.added === 1, `txt2img adds a picture to the gallery ("${r.text}")`);
  const first = await newestPicture(page);
  const caption = await page.textContent("#gallery figure:first-child figcaption");
  check(/Seed: 7/.test(caption) && /Steps: 4/.test(caption), "the gallery shows the picture's parameters");
  await shot("1-generated.png");

  // Send it to the edit panel and paint a mask with two mouse drags.
  await page.click("#gallery figure:first-child button:has-text('send to edit')");
  await page.waitForFunction(() => {
    const img = document.getElementById("edit-image");
    const c = document.getElementById("mask-canvas");
    return img.complete && img.naturalWidth > 0 && c.width === img.naturalWidth;
  }, null, { timeout: 5000 });
  const box = await page.locator("#mask-canvas").boundingBox();
  const at = (fx, fy) => [box.x + fx * box.width, box.y + fy * box.height];
  await page.mouse.move(...at(0.25, 0.3));
  await page.mouse.down();
  await page.mouse.move(...at(0.75, 0.3), { steps: 8 });
  await page.mouse.move(...at(0.75, 0.6), { steps: 8 });
  await page.mouse.up();
  await page.mouse.move(...at(0.3, 0.7));
  await page.mouse.down();
  await page.mouse.move(...at(0.7, 0.75), { steps: 8 });
  await page.mouse.up();
  // The share of white in the mask the page sends (maskCanvas(): white on black at the picture's size).
  const maskShare = () => page.evaluate(() => {
    const c = maskCanvas();
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let white = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] > 127) white++;
    return white / (c.width * c.height);
  });
  const painted = await maskShare();
  check(painted > 0.1 && painted < 0.9, `the drags paint the mask (${(painted * 100).toFixed(0)}% white)`);
  await page.click("#mask-invert");
  const inverted = await maskShare();
  check(Math.abs(inverted - (1 - painted)) < 0.05, "Invert inverts the mask");
  await page.click("#mask-invert");
  await shot("2-mask.png");

  // Inpaint (A1111 img2img with the mask): a new picture, different from the first.
  await page.fill("#prompt", "a crying face");
  await page.fill("#strength", "1");
  r = await runJob(page, "#run-inpaint", "inpaint");
  check(!r.error && r.added === 1, `inpaint adds a picture ("${r.text}")`);
  const inpainted = await newestPicture(page);
  const changed = await compare(page, first, inpainted);
  check(changed.pixels > 0, `the inpainted picture differs from the first (${changed.pixels} pixels)`);
  check(changed.inside > 2 * changed.outside, `it changed mostly inside the mask (mean difference ${
        changed.inside.toFixed(1)} inside, ${changed.outside.toFixed(1)} outside)`);

  // Blended editing (dmx's own endpoint), where this server has it.
  if (hasGenerate) {
    await page.selectOption("#background", "pixel");
    r = await runJob(page, "#run-blended", "blended pixel");
    check(!r.error && r.added === 1, `the blended edit adds a picture ("${r.text}")`);
    const blended = await newestPicture(page);
    const d = await compare(page, first, blended);
    check(d.pixels > 0, `the blended edit differs from the first (${d.pixels} pixels)`);
    check(d.inside > 2 && d.outside < 1, `the pixel background keeps the picture outside the mask (mean difference ${
          d.inside.toFixed(1)} inside, ${d.outside.toFixed(1)} outside)`);
  } else {
    log("note: this server has no /dmx/v1/generate: the blended edit is not checked");
  }
  await dmxPanels(page, dmxEndpoints, maskShare);
  await shot("3-edited.png");
  if (process.env.DMX_UPDATE_SCREENSHOT === "1") {
    const docs = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../docs/serve-page.png");
    await page.screenshot({ path: docs, fullPage: true });
    log("wrote", docs);
  }
  check(pageErrors.length === 0, "no script error on the page " + pageErrors.join("; "));
}

// The panels on dmx's own endpoints, each checked where the server has its endpoint.
async function dmxPanels(page, endpoints, maskShare) {
  const has = (p) => endpoints.includes(p) ||
                     (log("note: this server has no " + p + ": its panel is not checked"), false);
  if (has("/dmx/v1/diffedit")) {
    await page.click("#mask-clear");
    await page.fill("#diffedit-source", "a smiling face with sunglasses");
    const r = await runJob(page, "#run-diffedit", "DiffEdit");
    check(!r.error && r.added >= 1, `DiffEdit adds its edit to the gallery ("${r.text}")`);
    await page.waitForTimeout(200);  // the mask is drawn once its picture has loaded
    log(`DiffEdit's mask on the canvas: ${((await maskShare()) * 100).toFixed(0)}% white`);
  }
  if (has("/dmx/v1/canny")) {
    await page.click("#gallery figure:last-child button:has-text('ControlNet')");
    const r = await runJob(page, "#cn-preview", "Canny");
    const w = await page.evaluate(() => document.getElementById("cn-map").naturalWidth);
    check(!r.error && w > 0, `Preview Canny shows the map (${w} px wide, "${r.text}")`);
    // Generate with it: an A1111 ControlNet unit with the model of /dmx/v1/models' list.
    await page.check("#cn-enabled");
    const g = await runJob(page, "#generate", "txt2img");
    await page.uncheck("#cn-enabled");
    check(!g.error && g.added === 1,
          `Generate with the ControlNet unit adds a picture ("${g.text}")`);
  }
  if (has("/dmx/v1/p2p")) {
    await page.click("#p2p-panel summary");
    await page.fill("#p2p-prompt", "a smiling face with sunglasses");
    await page.fill("#p2p-edit", "a smiling face with sunglasses");
    await page.selectOption("#p2p-mode", "reweight");
    await page.locator("#p2p-words input[data-word=sunglasses]").fill("2");  // sent as reweight sunglasses=2
    const r = await runJob(page, "#run-p2p", "Prompt-to-Prompt", 60000);
    const widths = await page.evaluate(() => ["p2p-source", "p2p-result", "p2p-maps"].map(
        (id) => document.getElementById(id).naturalWidth));
    check(!r.error && widths.every((w) => w > 0),
          `Prompt-to-Prompt shows the source, the edit and the attention maps (${widths.join(", ")} px wide)`);
  }
}

let failed = false;
let browser = null;
try {
  const url = await startServer();
  log("dmx serve at", url);
  browser = await chromium.launch({ executablePath: chromiumPath, headless: true, args: ["--no-sandbox"] });
  await main(browser, url);
} catch (e) {
  failed = true;
  console.error("FAIL:", e.message);
  console.error("---- dmx serve's output ----\n" + serverLog.slice(-4000));
} finally {
  if (browser) await browser.close().catch(() => {});
  stopServer();
  await waitServerExit();
}
log(failed ? "browser test failed" : "browser test passed", "; screenshots in", outDir);
process.exit(failed ? 1 : 0);
