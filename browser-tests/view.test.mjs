// Browser tests of the clinician view: Debian's chromium driven by playwright-core, against
// the demo region (real `caremesh run` processes syncing over QUIC). Run through
// `cargo test --test browser`, which passes the binary in CAREMESH_BIN; or by hand:
//   CAREMESH_BIN=target/debug/caremesh node --test browser-tests/view.test.mjs
// Screenshots go to browser-tests/artefacts/.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const artefacts = join(here, "artefacts");
const binary = process.env.CAREMESH_BIN;
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
// Waits stop a broken test from hanging; they never assert how long things take.
const SYNC_WAIT_MS = 120_000;

let demo;
let demoDir;
let browser;
const links = {};

function portFree(port) {
  return new Promise((resolve) => {
    const server = createServer();
    server.once("error", () => resolve(false));
    server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
  });
}

async function freeBase() {
  for (let base = 31_000 + (process.pid % 50) * 100; base < 40_000; base += 211) {
    const free = await Promise.all([0, 1, 2, 3].map((i) => portFree(base + i)));
    if (free.every(Boolean)) return base;
  }
  throw new Error("no free port range for the demo region");
}

/** Starts the demo region and collects its launch links and the hub's pid. */
async function startDemo() {
  assert.ok(binary, "set CAREMESH_BIN to the caremesh binary");
  demoDir = mkdtempSync(join(tmpdir(), "caremesh-browser-"));
  const port = await freeBase();
  demo = spawn(binary, ["demo", "--patients", "40", "--port", String(port), "--dir", join(demoDir, "region")], {
    stdio: ["ignore", "pipe", "inherit"],
    env: { ...process.env, CAREMESH_LOG: "warn" },
  });
  let text = "";
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the demo did not start:\n${text}`)), 300_000);
    demo.stdout.on("data", (chunk) => {
      text += chunk;
      if (text.includes("Ctrl-C stops the region.")) {
        clearTimeout(timer);
        resolve();
      }
    });
    demo.once("exit", (code) => reject(new Error(`the demo exited (${code}):\n${text}`)));
  });
  for (const line of text.split("\n")) {
    const url = (line.match(/http:\/\/\S+\/launch\?token=\S+/) || [])[0];
    if (line.includes("Thames Valley Hub")) links.hubPid = Number(line.match(/pid (\d+)/)[1]);
    if (!url) continue;
    if (line.includes("Banbury Road Surgery")) links.gp = url;
    else if (line.includes("Oxford University Hospitals")) links.acute = url;
    else if (line.startsWith("Break-glass")) links.breakGlass = url;
    else if (line.includes("Sobell House Hospice")) links.hospice = url;
    else if (line.startsWith("Audit at the GP")) links.audit = url;
  }
  for (const name of ["gp", "acute", "hospice", "breakGlass", "audit", "hubPid"]) {
    assert.ok(links[name], `the demo printed no ${name} link:\n${text}`);
  }
}

before(async () => {
  mkdirSync(artefacts, { recursive: true });
  await startDemo();
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (demo && demo.exitCode === null) {
    demo.kill("SIGTERM");
    await new Promise((resolve) => demo.once("exit", resolve));
  }
  if (demoDir) rmSync(demoDir, { recursive: true, force: true });
});

/** A fresh browser session opened through a launch link: the page, on the patient. */
async function launch(url, viewport = { width: 1280, height: 900 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  // Console errors other than the design system's web font (which the CSP keeps off a
  // node that must work offline) mean a page broke: a script, a stylesheet, a policy.
  page.problems = [];
  page.on("console", (message) => {
    if (message.type() === "error" && !/assets\.nhs\.uk|font/i.test(message.text())) {
      page.problems.push(message.text());
    }
  });
  page.on("pageerror", (error) => page.problems.push(String(error)));
  const response = await page.goto(url);
  assert.equal(response.status(), 200, `launch refused: ${await page.content()}`);
  return page;
}

/** Reloads until `check` holds (sync may still be bringing data in). */
async function reloadUntil(page, check, what) {
  const deadline = Date.now() + SYNC_WAIT_MS;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) assert.fail(`never: ${what}`);
    await page.waitForTimeout(1000);
    await page.reload();
  }
}

/** A new launch link for a clinician at the demo node in `folder`, as `caremesh launch` makes it. */
function newLaunch(folder, link, nhs, name) {
  const base = new URL(link).origin;
  const made = spawnSync(binary, ["launch", "--dir", join(demoDir, "region", folder), "--user", "browser-test",
    "--name", name, "--nhs", nhs, "--base", base], { encoding: "utf8" });
  assert.equal(made.status, 0, made.stderr);
  return made.stdout.trim();
}

async function sourceNames(page) {
  return page.$$eval("#sources input[data-source]", (boxes) => boxes.map((b) => b.dataset.source));
}

async function axeViolations(page) {
  await page.evaluate(axeSource);
  const results = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  return results.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
}

test("a record opened through a launch link joins three organisations, accessibly", async () => {
  const page = await launch(links.gp);
  await reloadUntil(page, async () => (await sourceNames(page)).length === 3,
    "the GP's page lists GP, hospital and hospice as sources");
  assert.deepEqual((await sourceNames(page)).sort(), ["8HA15", "A81001", "RTH"]);
  // Header: name, NHS number 3-3-4, date of birth, registered GP.
  assert.ok((await page.textContent("#patient-name")).trim().length > 0);
  assert.match(await page.textContent("#nhs-number"), /^\d{3} \d{3} \d{4}$/);
  const header = await page.textContent(".caremesh-patient");
  assert.match(header, /Date of birth\s*\d{2}-[A-Z][a-z]{2}-\d{4}/);
  // Every organisation names the practice; the banner names it, not its code alone.
  assert.match(header, /Registered GP\s*Banbury Road Surgery \(A81001\)/);
  // The demo patient is one a clinician would believe: in palliative care, known to all three.
  const summary = await page.textContent("#summary");
  assert.match(summary, /Sobell House Hospice/);
  assert.match(summary, /Oxford University Hospitals/);
  assert.doesNotMatch(await page.textContent("#summary-results"), /consultation/i,
    "consultation notes are not results");
  // Sections with counts equal to the sources' versions listed; every version names its
  // organisation and dates.
  const sections = await page.$$eval(".caremesh-section", (cards) => cards.map((card) => ({
    count: Number(card.dataset.versions),
    versions: card.querySelectorAll(".caremesh-from").length,
  })));
  assert.ok(sections.length >= 10, "every clinical section is shown");
  for (const section of sections) assert.equal(section.count, section.versions);
  const versions = await page.$$eval(".caremesh-from", (froms) => froms.map((f) => f.textContent));
  assert.ok(versions.length > 0);
  for (const version of versions) assert.match(version, /recorded/);
  // The same fact from several organisations is one entry listing each, not duplicates.
  const shared = await page.$$eval("tr.caremesh-entry", (rows) => rows
    .map((row) => ({
      sources: row.dataset.sources.split(" "),
      versions: [...row.querySelectorAll(".caremesh-from")].map((f) => f.dataset.source),
      tag: row.querySelector(".caremesh-sources-tag")?.textContent || "",
    }))
    .filter((entry) => entry.sources.length > 1));
  assert.ok(shared.length > 0, "the demo patient has facts recorded by more than one organisation");
  for (const entry of shared) {
    assert.deepEqual([...new Set(entry.versions)].sort(), [...entry.sources].sort());
    assert.equal(entry.tag, `${entry.sources.length} sources`);
  }
  // The timeline: encounters and documents from more than one organisation, newest first.
  const timeline = await page.$$eval("#timeline li", (items) =>
    items.map((li) => ({ source: li.dataset.source, date: li.dataset.date })));
  assert.ok(new Set(timeline.map((t) => t.source)).size > 1, "the timeline joins organisations");
  const dates = timeline.map((t) => t.date).filter(Boolean);
  assert.deepEqual(dates, [...dates].sort().reverse(), "newest first");
  // Sources panel: kind, data as of and feed for each.
  const panel = await page.textContent("#sources");
  assert.match(panel, /Data as of \d{2}-[A-Z][a-z]{2}-\d{4} \d{2}:\d{2}/);
  assert.match(panel, /batch|live|synced/);
  const violations = await axeViolations(page);
  assert.deepEqual(violations.map((v) => `${v.id}: ${v.help}`), [], "axe: no serious or critical violations");
  await page.screenshot({ path: join(artefacts, "record-gp.png"), fullPage: true });
  await page.screenshot({ path: join(artefacts, "record-gp-top.png") });
  await page.locator(".caremesh-sources-tag").first().scrollIntoViewIfNeeded();
  await page.screenshot({ path: join(artefacts, "record-gp-shared-entry.png") });

  // Unticking a source, the viewer's own included, hides its items and only its items.
  const visible = (ods) => page.$$eval(`.caremesh-from[data-source="${ods}"]`,
    (froms) => froms.filter((f) => f.offsetParent !== null).length);
  const ownBefore = await visible("A81001");
  const hospitalBefore = await visible("RTH");
  assert.ok(ownBefore > 0 && hospitalBefore > 0);
  await page.uncheck('#sources input[data-source="A81001"]');
  assert.equal(await visible("A81001"), 0, "the GP's own items are hidden");
  assert.equal(await visible("RTH"), hospitalBefore, "the hospital's stay");
  assert.equal(await page.locator('#timeline li[data-source="A81001"]:visible').count(), 0,
    "and the GP's events leave the timeline");
  await page.screenshot({ path: join(artefacts, "record-gp-own-unticked.png"), fullPage: true });
  await page.check('#sources input[data-source="A81001"]');
  assert.equal(await visible("A81001"), ownBefore);

  // Copy reference: a citation naming the fact, its organisation, its date and today.
  await page.context().grantPermissions(["clipboard-read", "clipboard-write"]);
  const first = page.locator('.caremesh-from[data-source="RTH"] button.caremesh-copy').first();
  const expected = await first.getAttribute("data-reference");
  await first.click();
  await page.waitForFunction((button) => button.textContent === "Copied", await first.elementHandle());
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  assert.equal(copied, expected);
  assert.match(copied, /, Oxford University Hospitals, (\d{2}-[A-Z][a-z]{2}-\d{4}|undated) — viewed in the shared care record \d{2}-[A-Z][a-z]{2}-\d{4}$/);

  // Read-only: no form or control that could change the record.
  assert.equal(await page.locator("input[type=text], textarea, select, [contenteditable=true]").count(), 0);

  assert.deepEqual(page.problems.filter((p) => !/401|403/.test(p)), [], "no script, style or policy errors");

  // Printing shows only the notice.
  await page.emulateMedia({ media: "print" });
  assert.equal(await page.isVisible("#patient-name"), false);
  assert.equal(await page.isVisible(".caremesh-print-notice"), true);
  await page.context().close();
});

/** Ingests `file` at the demo node in `folder`, as its clinical system's extract would arrive. */
function ingestInto(folder, file) {
  const made = spawnSync(binary, ["ingest", "--dir", join(demoDir, "region", folder), file], { encoding: "utf8" });
  assert.equal(made.status, 0, `${made.stdout}\n${made.stderr}`);
}

const EDGE_NHS = "9990000018";

test("clinical safety: summary first, allergies sharing a code apart, identity conflicts and death flagged", async () => {
  // The edge-case patient (tests/fixtures/clinical) at the GP; the hospice sends a Patient
  // for the same NHS number with another name, date of birth and a death.
  ingestInto("gp", join(here, "..", "tests", "fixtures", "clinical", "edge-cases.json"));
  const hospicePatient = join(demoDir, "hospice-patient.json");
  writeFileSync(hospicePatient, JSON.stringify({
    resourceType: "Patient", id: "hospice-edge", meta: { lastUpdated: "2026-11-29T10:00:00Z" },
    identifier: [{ system: "https://fhir.nhs.uk/Id/nhs-number", value: EDGE_NHS }],
    name: [{ use: "official", family: "EDGAR", given: ["Alicia"] }], birthDate: "1984-07-01",
    gender: "female", deceasedDateTime: "2026-11-28T03:10:00Z",
  }));
  ingestInto("hospice", hospicePatient);

  const page = await launch(newLaunch("gp", links.gp, EDGE_NHS, "Dr Safety Test"), { width: 1280, height: 800 });
  await reloadUntil(page, async () => (await page.locator("#identity-conflict").count()) > 0,
    "the hospice's Patient reaches the GP and the disagreement shows");
  // The GP's own demographics, named as such; the hospice's version listed in the warning.
  assert.equal((await page.textContent("#patient-name")).trim(), "Alice EDGE");
  assert.match(await page.textContent("#demographics-source"), /Banbury Road Surgery/);
  const conflict = await page.textContent("#identity-conflict");
  assert.match(conflict, /Check this is the right patient/);
  assert.match(conflict, /Sobell House Hospice \(8HA15\): Alicia EDGAR/);
  assert.match(conflict, /Banbury Road Surgery \(A81001\): Alice EDGE/);
  assert.match(conflict, /01-Jul-1984/);
  assert.match(await page.textContent("#deceased"), /Deceased 28-Nov-2026 03:10/);
  // Dead by the hospice's record: the banner gives her age at death, not today's.
  assert.match(await page.textContent("#patient-banner"), /01-Jul-1948 \(78 years at death\)/);

  // The first screen (1280x800) holds the summary: allergies, current medication, problems.
  for (const block of ["#summary-allergies", "#summary-medications", "#summary-problems"]) {
    const box = await page.locator(block).boundingBox();
    assert.ok(box && box.y < 800, `${block} starts within the first screen (${box && box.y})`);
  }
  const allergies = await page.textContent("#summary-allergies");
  for (const substance of ["Septrin", "Allergy to egg protein", "Amoxicillin 250mg capsules"]) {
    assert.ok(allergies.includes(substance), `${substance} is visible in the summary: ${allergies}`);
  }
  assert.match(allergies, /Conflict: No known drug allergy/);
  assert.doesNotMatch(allergies, /penicillin/i, "a refuted allergy is not an allergy");
  const problems = await page.textContent("#summary-problems");
  assert.doesNotMatch(problems, /Myocardial infarction/, "a refuted diagnosis is not an active problem");
  assert.match(problems, /Type 2 diabetes mellitus/);
  assert.equal(await page.locator('#problems tr[data-standing="refuted"]').count(), 1);
  assert.match(await page.textContent("#problems"), /Refuted: the source records that this is not the case/);
  const medication = await page.textContent("#summary-medications");
  assert.match(medication, /Levothyroxine sodium 50microgram tablets/);
  assert.match(medication, /1 to 2 tablet, 1 to 2 times every 4 hours, when required for pain/);
  assert.doesNotMatch(medication, /Simvastatin/, "a stopped medicine is not current");
  assert.match(await page.textContent("#medications"), /2 issues, latest first/);
  const results = await page.textContent("#results");
  assert.match(results, /13\.1 ×10⁹\/L/);
  assert.match(results, /Range\s*4\.0 to 11\.0 ×10⁹\/L/);
  assert.match(results, /No value: Sample haemolysed/);
  // A repeated test is one series: the latest result shown, the earlier ones folded under it.
  assert.match(await page.textContent("#results .caremesh-series summary"), /1 earlier White blood cell count result/);
  const latestRows = await page.$$eval("#results tr.caremesh-entry", (rows) => rows
    .filter((row) => !row.closest(".caremesh-series")).map((row) => row.textContent));
  const wccLatest = latestRows.find((row) => /White blood cell count/.test(row));
  assert.match(wccLatest, /7\.2 ×10⁹\/L/);
  assert.doesNotMatch(wccLatest, /13\.1/);
  assert.match(results, /01-Jul-2026 00:30/, "23:30 UTC on 30 June is 00:30 on 1 July in the UK");
  assert.match(results, /Diastolic blood pressure: 82\.6 mmHg/);
  await page.screenshot({ path: join(artefacts, "record-summary-1280x800.png") });
  await page.locator("#identity-conflict").screenshot({ path: join(artefacts, "record-identity-conflict.png") });
  await page.locator("#allergies").screenshot({ path: join(artefacts, "record-allergies-degraded-codes.png") });
  await page.locator("#medications").screenshot({ path: join(artefacts, "record-medications.png") });
  await page.locator("#results").screenshot({ path: join(artefacts, "record-results-ranges.png") });

  // The banner stays in view while the clinician reads further down.
  await page.locator("#results").scrollIntoViewIfNeeded();
  const banner = await page.locator("#patient-banner").boundingBox();
  assert.ok(banner && banner.y >= 0 && banner.y < 5, `the banner stays at the top (${banner && banner.y})`);
  let violations = await axeViolations(page);
  assert.deepEqual(violations.map((v) => `${v.id}: ${v.help}`), [], "axe: no serious or critical violations");
  assert.deepEqual(page.problems.filter((p) => !/401|403/.test(p)), [], "no script, style or policy errors");
  await page.context().close();

  // A phone in a patient's home: 375 px wide, nothing wider than the screen.
  const narrow = await launch(newLaunch("gp", links.gp, EDGE_NHS, "Dr Safety Test"), { width: 375, height: 812 });
  const width = await narrow.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 376, `the page fits 375 px (${width} px wide)`);
  assert.ok(await narrow.isVisible("#summary-allergies"));
  violations = await axeViolations(narrow);
  assert.deepEqual(violations.map((v) => `${v.id}: ${v.help}`), [], "axe at 375 px");
  await narrow.screenshot({ path: join(artefacts, "record-narrow-375.png"), fullPage: true });
  await narrow.context().close();
});

test("break-glass: hidden without Share In, opened with a reason, flagged", async () => {
  const page = await launch(links.breakGlass);
  await reloadUntil(page, () => page.isVisible("#share-in-off"),
    "the hospice page says the GP's data is not shown without Share In");
  assert.equal(await page.locator('.caremesh-from[data-source="A81001"]').count(), 0);
  await page.screenshot({ path: join(artefacts, "break-glass-before.png"), fullPage: true });
  await page.fill("#reason", "Deteriorating, needs GP medication history");
  await Promise.all([page.waitForNavigation(), page.getByRole("button", { name: "Use emergency access" }).click()]);
  if (!(await page.isVisible("#break-glass-active"))) {
    assert.fail(`no break-glass banner after submitting:\n${await page.textContent("main")}`);
  }
  assert.match(await page.textContent("#break-glass-active"), /Deteriorating, needs GP medication history/);
  assert.ok(await page.locator('.caremesh-from.break-glass[data-source="A81001"]').count() > 0,
    "the GP's rows are shown, marked as shown by break-glass");
  const violations = await axeViolations(page);
  assert.deepEqual(violations.map((v) => `${v.id}: ${v.help}`), []);
  await page.screenshot({ path: join(artefacts, "break-glass-after.png"), fullPage: true });
  await page.context().close();
});

test("an auditor's report lists who viewed the patient, here and elsewhere, accessibly", async () => {
  // A clinician at the hospital views the GP's patient; the GP's auditor then sees it.
  const patient = JSON.parse(Buffer.from(links.gp.split("token=")[1].split(".")[1], "base64url").toString()).nhs;
  const viewer = await launch(newLaunch("acute", links.acute, patient, "Dr Browser Test"));
  assert.match(viewer.url(), new RegExp(`/patients/${patient}$`));
  await viewer.context().close();
  const page = await launch(links.audit);
  assert.match(page.url(), /\/audit$/);
  await page.fill("#patient", patient);
  await reloadUntil(page, async () => {
    await Promise.all([page.waitForNavigation(), page.getByRole("button", { name: "Report" }).click()]);
    return (await page.locator("#report tbody tr", { hasText: "Oxford University Hospitals (RTH) #" }).count()) > 0;
  }, "the GP's report lists the hospital's view");
  const row = await page.locator("#report tbody tr", { hasText: "Oxford University Hospitals (RTH) #" }).first().textContent();
  assert.match(row, /Dr Browser Test/);
  assert.match(row, /clinician/);
  assert.match(row, /view/);
  assert.match(row, /A81001/, "it showed the GP's data");
  const violations = await axeViolations(page);
  assert.deepEqual(violations.map((v) => `${v.id}: ${v.help}`), []);
  await page.screenshot({ path: join(artefacts, "audit-report.png"), fullPage: true });
  await page.context().close();
});

test("the offline banner appears when the hub stops, and the record keeps serving", async () => {
  const page = await launch(links.acute);
  await reloadUntil(page, async () => (await sourceNames(page)).length === 3,
    "the hospital's page joins three organisations");
  assert.equal(await page.isVisible("#offline"), false, "no banner while the hub is up");
  process.kill(links.hubPid, "SIGTERM");
  await reloadUntil(page, () => page.isVisible("#offline"), "the offline banner");
  const banner = await page.textContent("#offline");
  assert.match(banner, /Thames Valley Hub \(HUB01\) unreachable since \d{2}-[A-Z][a-z]{2}-\d{4} \d{2}:\d{2}/);
  assert.match(banner, /last synced \d{2}-[A-Z][a-z]{2}-\d{4} \d{2}:\d{2}/);
  assert.match(banner, /Showing data held on this device/);
  assert.deepEqual((await sourceNames(page)).sort(), ["8HA15", "A81001", "RTH"]);
  const violations = await axeViolations(page);
  assert.deepEqual(violations.map((v) => `${v.id}: ${v.help}`), []);
  await page.screenshot({ path: join(artefacts, "offline.png"), fullPage: true });

  // The README's walkthrough: a new result ingested at the practice while the hub is down
  // shows at the practice at once, reaches the hospital once the hub is back.
  const raised = /Serum potassium level[\s\S]*?5\.9 mmol\/L/;
  ingestInto("gp", join(demoDir, "region", "offline-result.json"));
  const nhs = new URL(page.url()).pathname.split("/").pop();
  const practice = await launch(newLaunch("gp", links.gp, nhs, "Dr Walkthrough"));
  assert.match(await practice.textContent("#results"), raised, "the practice shows it at once");
  await practice.context().close();
  await page.reload();
  assert.doesNotMatch(await page.textContent("#results"), raised, "the hospital has not had it yet");
  const hub = spawn(binary, ["run", "--dir", join(demoDir, "region", "hub")], { stdio: "ignore" });
  try {
    await reloadUntil(page, async () => raised.test(await page.textContent("#results")),
      "the result reaching the hospital after the hub came back");
  } finally {
    hub.kill("SIGTERM");
  }
  await page.context().close();
});
