// Bundle the example page (React + supabase-js + this package) into example/dist/app.js.
import { build } from 'esbuild'

await build({
  entryPoints: [new URL('./src/main.tsx', import.meta.url).pathname],
  outfile: new URL('./dist/app.js', import.meta.url).pathname,
  bundle: true,
  format: 'esm',
  jsx: 'automatic',
  target: 'es2022',
  define: { 'process.env.NODE_ENV': '"production"' },
  logLevel: 'warning',
})
