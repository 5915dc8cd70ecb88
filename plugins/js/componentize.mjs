// Builds a JavaScript plugin into a wasm component with the componentize()
// API of @bytecodealliance/componentize-js (the `jco componentize` command
// cannot read files in some sandboxes; the API can).
//
//   node plugins/js/componentize.mjs SOURCE.js OUT.wasm [FEATURE,...]
//
// Every optional feature of componentize-js is disabled unless the third
// argument enables it (a comma-separated list of stdio, random, clocks, http,
// fetch-event), e.g. `http` for the standard `fetch` over the world's
// wasi:http/outgoing-handler import. (plugins/js/reward-granter calls the
// wasi:http imports itself instead, and needs no feature: in 0.23 `fetch`
// traps when a request with a body fails, e.g. on a refused connection.)
//
// componentize-js is looked up in NODE_PATH if set (scripts/install-guest-tools.sh
// prints the folder it installs into), else in ./node_modules.
import { writeFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const FEATURES = ['stdio', 'random', 'clocks', 'http', 'fetch-event'];
const [source, out, enable = '', ...rest] = process.argv.slice(2);
const enabled = enable.split(',').filter((feature) => feature !== '');
const unknown = enabled.filter((feature) => !FEATURES.includes(feature));
if (!source || !out || rest.length > 0 || unknown.length > 0) {
  console.error(`usage: node componentize.mjs SOURCE.js OUT.wasm [FEATURE,...] (features: ${FEATURES.join(', ')})`);
  process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
// Where componentize-js is installed: NODE_PATH, or ./node_modules.
const modules = process.env.NODE_PATH || resolve('node_modules');
// The package is ESM-only: import its entry point by path.
const entry = resolve(modules, '@bytecodealliance/componentize-js/src/componentize.js');
const { componentize } = await import(pathToFileURL(entry).href);

const { component } = await componentize({
  sourcePath: resolve(source),
  witPath: resolve(here, '../../wit'),
  worldName: 'plugin',
  // mqplug grants no clocks, randomness or stdio anyway, and HTTP only to
  // the plugins that use it; leaving the features out keeps the component's
  // imports small.
  disableFeatures: FEATURES.filter((feature) => !enabled.includes(feature)),
});
await writeFile(out, component);
console.error(`built ${out} (${component.length} bytes)`);
