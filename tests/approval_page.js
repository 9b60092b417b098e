// Approves a held request on loopgate's approval page with a real click in
// headless Chromium (Debian's chromium, driven by playwright-core).
// usage: node approval_page.js PLAYWRIGHT_CORE_DIR SIGN_IN_URL APPROVAL_ID SCREENSHOT
const [pw, url, id, shot] = process.argv.slice(2);
const { chromium } = require(pw);

(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage();
    await page.goto(url);                       // ?token=… sets the cookie, redirects to the list
    await page.waitForSelector(`#approve-${id}`);
    const row = await page.textContent(`#req-${id}`);
    await page.fill(`#req-${id} form[action$="/approve"] input[name=reason]`, 'clicked in chromium');
    await page.click(`#approve-${id}`);
    await page.waitForSelector('#empty');       // the request is gone from the list
    await page.screenshot({ path: shot });
    console.log(JSON.stringify({ ok: true, row, title: await page.title() }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
