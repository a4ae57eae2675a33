# convviz: Zeiler & Fergus (2014), "Visualizing and Understanding Convolutional Networks",
# as a Snakemake workflow. Read top to bottom like the paper's table of contents.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/top9.smk"
include: "rules/evolution.smk"
include: "rules/invariance.smk"
include: "rules/occlusion.smk"
include: "rules/correspondence.smk"
include: "rules/compare.smk"
include: "rules/transfer.smk"
# Keep last: the report reads what every rule above adds to OUTPUTS.
include: "rules/report.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
