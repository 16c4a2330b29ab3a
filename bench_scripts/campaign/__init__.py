"""The paper-scale campaign as one resumable command that fits a short block of GPU time (issue 20).

    python -m bench_scripts.campaign --protocol gpu --data DIR --out DIR [--budget-s 540] [--stage ...]
        [--backdoorbench DIR] [--work DIR] [--dry-run]

``plan`` builds the one plan (stages, commands, estimates and the measured figures they rest on: ``figures``,
``profiles``), ``runner`` runs it inside the budget and resumes it, ``smoke`` is the in-process smoke check and
``collect`` writes what comes back. See docs/campaign.md.
"""
