// The generated types match the server: CI fails when the API, the event schema or the
// protocol changed and `make ts-generate` was not run.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
const run = promisify(execFile);
const generate = (...args) => run(process.execPath, [join(pkg, "scripts/generate.mjs"), ...args], { cwd: pkg });

test("the committed generated types are what the server's schemas generate", async () => {
  const { stdout } = await generate("--check");
  assert.match(stdout, /up to date/);
});

test("a difference fails the check and names the file", async () => {
  const copy = mkdtempSync(join(tmpdir(), "cpa-generated-"));
  try {
    cpSync(join(pkg, "src/generated"), copy, { recursive: true });
    const file = join(copy, "event.ts");
    writeFileSync(file, readFileSync(file, "utf8").replace("job_id: string;", "job_id: number;"));
    const error = await generate("--check", `--out=${copy}`).catch((e) => e);
    assert.equal(error.code, 1);
    assert.match(error.stderr, /out of date.*event\.ts.*make ts-generate/s);
  } finally {
    rmSync(copy, { recursive: true, force: true });
  }
});
