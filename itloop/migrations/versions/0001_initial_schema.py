"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=120), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "in_flight",
                "done",
                name="idempotency_state",
                native_enum=False,
                create_constraint=True,
                length=24,
            ),
            nullable=False,
        ),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("scope", "key", name=op.f("uq_idempotency_keys_scope_key")),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("class_label", sa.String(length=200), nullable=False),
        sa.Column("width_px", sa.Integer(), nullable=False),
        sa.Column("height_px", sa.Integer(), nullable=False),
        sa.Column("media_type", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("sha256", name=op.f("uq_images_sha256")),
    )
    op.create_table(
        "protocols",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("eps_l2", sa.JSON(), nullable=False),
        sa.Column("images_per_site", sa.Integer(), nullable=False),
        sa.Column("repeats", sa.Integer(), nullable=False),
        sa.Column("on_ms", sa.Float(), nullable=False),
        sa.Column("off_ms", sa.Float(), nullable=False),
        sa.Column("size_deg", sa.Float(), nullable=False),
        sa.Column("window_start_ms", sa.Float(), nullable=False),
        sa.Column("window_end_ms", sa.Float(), nullable=False),
        sa.Column("controls", sa.JSON(), nullable=False),
        sa.Column("image_source", sa.Text(), nullable=False),
        sa.Column("attack_steps", sa.Integer(), nullable=False),
        sa.Column("images_per_trial", sa.Integer(), nullable=False),
        sa.Column("min_partner_spacing_s", sa.Float(), nullable=False),
        sa.Column("allow_image_reuse", sa.Boolean(), nullable=False),
        sa.Column("config_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("attack_steps > 0", name=op.f("ck_protocols_attack_steps_positive")),
        sa.CheckConstraint(
            "images_per_site > 0", name=op.f("ck_protocols_images_per_site_positive")
        ),
        sa.CheckConstraint("on_ms > 0 AND off_ms >= 0", name=op.f("ck_protocols_timing_positive")),
        sa.CheckConstraint("repeats >= 1", name=op.f("ck_protocols_repeats_positive")),
        sa.CheckConstraint("size_deg > 0", name=op.f("ck_protocols_size_positive")),
        sa.CheckConstraint(
            "window_start_ms >= 0 AND window_end_ms > window_start_ms",
            name=op.f("ck_protocols_window_ordered"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_protocols")),
        sa.UniqueConstraint("name", name=op.f("uq_protocols_name")),
    )
    op.create_table(
        "rigs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("monitor_width_cm", sa.Float(), nullable=True),
        sa.Column("viewing_distance_cm", sa.Float(), nullable=True),
        sa.Column("resolution_w_px", sa.Integer(), nullable=True),
        sa.Column("resolution_h_px", sa.Integer(), nullable=True),
        sa.Column("refresh_rate_hz", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rigs")),
        sa.UniqueConstraint("name", name=op.f("uq_rigs_name")),
    )
    op.create_table(
        "subjects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("species", sa.String(length=80), nullable=False),
        sa.Column("sex", sa.String(length=1), nullable=False),
        sa.Column("date_of_birth", sa.Date(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subjects")),
        sa.UniqueConstraint("name", name=op.f("uq_subjects_name")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("display_name", sa.String(length=120), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "admin",
                "staff",
                "analyst",
                name="role",
                native_enum=False,
                create_constraint=True,
                length=24,
            ),
            nullable=False,
        ),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("lookup", sa.String(length=32), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "user",
                "rig",
                "worker",
                name="token_kind",
                native_enum=False,
                create_constraint=True,
                length=24,
            ),
            nullable=False,
        ),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("rig_id", sa.Integer(), nullable=True),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind <> 'rig' OR rig_id IS NOT NULL", name=op.f("ck_api_tokens_rig_token_has_rig")
        ),
        sa.CheckConstraint(
            "kind <> 'user' OR user_id IS NOT NULL", name=op.f("ck_api_tokens_user_token_has_user")
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_api_tokens_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["rig_id"], ["rigs.id"], name=op.f("fk_api_tokens_rig_id_rigs"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("lookup", name=op.f("uq_api_tokens_lookup")),
    )
    op.create_table(
        "arrays",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("region", sa.String(length=80), nullable=False),
        sa.Column("n_channels", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(length=80), nullable=False),
        sa.Column("implanted_on", sa.Date(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("n_channels > 0", name=op.f("ck_arrays_positive_channels")),
        sa.ForeignKeyConstraint(
            ["subject_id"],
            ["subjects.id"],
            name=op.f("fk_arrays_subject_id_subjects"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_arrays")),
        sa.UniqueConstraint("subject_id", "name", name=op.f("uq_arrays_subject_id_name")),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("backbone", sa.String(length=80), nullable=False),
        sa.Column("layer", sa.String(length=80), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=False),
        sa.Column("training_data_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("code_version", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_versions.id"],
            name=op.f("fk_model_versions_parent_id_model_versions"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["subject_id"],
            ["subjects.id"],
            name=op.f("fk_model_versions_subject_id_subjects"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_user_id", sa.Integer(), nullable=True),
        sa.Column("actor_token_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=64), nullable=False),
        sa.Column("target_id", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["actor_token_id"],
            ["api_tokens.id"],
            name=op.f("fk_audit_log_actor_token_id_api_tokens"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["actor_user_id"],
            ["users.id"],
            name=op.f("fk_audit_log_actor_user_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)
        batch_op.create_index("ix_audit_log_target", ["target_type", "target_id"], unique=False)

    op.create_table(
        "recording_sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("array_id", sa.Integer(), nullable=False),
        sa.Column("electrode", sa.Integer(), nullable=False),
        sa.Column("acq_channel", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=80), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "acq_channel >= 0", name=op.f("ck_recording_sites_acq_channel_nonnegative")
        ),
        sa.CheckConstraint("electrode >= 0", name=op.f("ck_recording_sites_electrode_nonnegative")),
        sa.ForeignKeyConstraint(
            ["array_id"],
            ["arrays.id"],
            name=op.f("fk_recording_sites_array_id_arrays"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recording_sites")),
        sa.UniqueConstraint(
            "array_id", "acq_channel", name=op.f("uq_recording_sites_array_id_acq_channel")
        ),
        sa.UniqueConstraint(
            "array_id", "electrode", name=op.f("uq_recording_sites_array_id_electrode")
        ),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("rig_id", sa.Integer(), nullable=False),
        sa.Column("protocol_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "scheduled",
                "generating",
                "ready",
                "running",
                "uploaded",
                "analysed",
                "failed",
                "cancelled",
                name="session_state",
                native_enum=False,
                create_constraint=True,
                length=24,
            ),
            nullable=False,
        ),
        sa.Column("state_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_sessions_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_sessions_model_version_id_model_versions"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["protocol_id"],
            ["protocols.id"],
            name=op.f("fk_sessions_protocol_id_protocols"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["rig_id"], ["rigs.id"], name=op.f("fk_sessions_rig_id_rigs"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["subject_id"],
            ["subjects.id"],
            name=op.f("fk_sessions_subject_id_subjects"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sessions_rig_id"), ["rig_id"], unique=False)
        batch_op.create_index(
            "ix_sessions_subject_scheduled", ["subject_id", "scheduled_for"], unique=False
        )

    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("inputs_sha256", sa.String(length=64), nullable=False),
        sa.Column("code_version", sa.String(length=64), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_analyses_model_version_id_model_versions"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_analyses_session_id_sessions"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["subject_id"],
            ["subjects.id"],
            name=op.f("fk_analyses_subject_id_subjects"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analyses")),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("n_stimuli", sa.Integer(), nullable=False),
        sa.Column("n_presentations", sa.Integer(), nullable=False),
        sa.Column("spare_event_codes", sa.JSON(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pulled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_batches_session_id_sessions"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("session_id", name=op.f("uq_batches_session_id")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                name="job_state",
                native_enum=False,
                create_constraint=True,
                length=24,
            ),
            nullable=False,
        ),
        sa.Column("workflow_id", sa.String(length=120), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=True),
        sa.Column("subject_id", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("eta_s", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_jobs_attempts_nonnegative")),
        sa.CheckConstraint(
            "progress >= 0 AND progress <= 1", name=op.f("ck_jobs_progress_fraction")
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_jobs_session_id_sessions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["subject_id"],
            ["subjects.id"],
            name=op.f("fk_jobs_subject_id_subjects"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("workflow_id", name=op.f("uq_jobs_workflow_id")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_kind"), ["kind"], unique=False)

    op.create_table(
        "model_version_sites",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("readout_index", sa.Integer(), nullable=False),
        sa.Column("heldout_r", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_version_sites_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["recording_sites.id"],
            name=op.f("fk_model_version_sites_site_id_recording_sites"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("model_version_id", "site_id", name=op.f("pk_model_version_sites")),
        sa.UniqueConstraint(
            "model_version_id",
            "readout_index",
            name=op.f("uq_model_version_sites_model_version_id_readout_index"),
        ),
    )
    op.create_table(
        "session_sites",
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_session_sites_session_id_sessions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["recording_sites.id"],
            name=op.f("fk_session_sites_site_id_recording_sites"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("session_id", "site_id", name=op.f("pk_session_sites")),
    )
    op.create_table(
        "stimuli",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "clean",
                "attack",
                "noise",
                "interpolation",
                name="stimulus_kind",
                native_enum=False,
                create_constraint=True,
                length=24,
            ),
            nullable=False,
        ),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("site_id", sa.Integer(), nullable=True),
        sa.Column("eps_requested_l2", sa.Float(), nullable=True),
        sa.Column("eps_realised_l2", sa.Float(), nullable=True),
        sa.Column("sign", sa.Integer(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("predicted_clean", sa.Float(), nullable=True),
        sa.Column("predicted_perturbed", sa.Float(), nullable=True),
        sa.Column("control_partner_image_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(kind = 'clean' AND parent_id IS NULL AND eps_requested_l2 IS NULL) OR (kind <> 'clean' AND parent_id IS NOT NULL AND eps_requested_l2 IS NOT NULL AND eps_realised_l2 IS NOT NULL)",
            name=op.f("ck_stimuli_clean_or_derived"),
        ),
        sa.CheckConstraint(
            "kind <> 'attack' OR (site_id IS NOT NULL AND sign IS NOT NULL AND model_version_id IS NOT NULL AND predicted_clean IS NOT NULL AND predicted_perturbed IS NOT NULL)",
            name=op.f("ck_stimuli_attack_is_recorded"),
        ),
        sa.CheckConstraint(
            "eps_realised_l2 IS NULL OR eps_realised_l2 >= 0",
            name=op.f("ck_stimuli_eps_realised_nonnegative"),
        ),
        sa.CheckConstraint(
            "eps_requested_l2 IS NULL OR eps_requested_l2 > 0",
            name=op.f("ck_stimuli_eps_requested_positive"),
        ),
        sa.CheckConstraint("sign IS NULL OR sign IN (-1, 1)", name=op.f("ck_stimuli_sign_is_unit")),
        sa.ForeignKeyConstraint(
            ["control_partner_image_id"],
            ["images.id"],
            name=op.f("fk_stimuli_control_partner_image_id_images"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_stimuli_image_id_images"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_stimuli_model_version_id_model_versions"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["stimuli.id"],
            name=op.f("fk_stimuli_parent_id_stimuli"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_stimuli_session_id_sessions"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["recording_sites.id"],
            name=op.f("fk_stimuli_site_id_recording_sites"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stimuli")),
    )
    with op.batch_alter_table("stimuli", schema=None) as batch_op:
        batch_op.create_index("ix_stimuli_session_kind", ["session_id", "kind"], unique=False)

    op.create_table(
        "presentations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("stimulus_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("trial_index", sa.Integer(), nullable=False),
        sa.Column("event_code", sa.Integer(), nullable=False),
        sa.Column("onset_ticks", sa.BigInteger(), nullable=True),
        sa.Column("tick_rate_hz", sa.Integer(), nullable=True),
        sa.Column("photodiode_delay_ticks", sa.BigInteger(), nullable=True),
        sa.Column("fixation_ok", sa.Boolean(), nullable=True),
        sa.Column("frame_drops", sa.Integer(), nullable=False),
        sa.Column("valid", sa.Boolean(), nullable=True),
        sa.Column("invalid_reason", sa.String(length=200), nullable=True),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "frame_drops >= 0", name=op.f("ck_presentations_frame_drops_nonnegative")
        ),
        sa.CheckConstraint(
            "tick_rate_hz IS NULL OR tick_rate_hz > 0",
            name=op.f("ck_presentations_tick_rate_positive"),
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_presentations_session_id_sessions"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["stimulus_id"],
            ["stimuli.id"],
            name=op.f("fk_presentations_stimulus_id_stimuli"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_presentations")),
        sa.UniqueConstraint(
            "session_id", "event_code", name=op.f("uq_presentations_session_id_event_code")
        ),
        sa.UniqueConstraint("session_id", "seq", name=op.f("uq_presentations_session_id_seq")),
    )
    with op.batch_alter_table("presentations", schema=None) as batch_op:
        batch_op.create_index("ix_presentations_stimulus", ["stimulus_id"], unique=False)

    op.create_table(
        "sensitivity_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("analysis_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("eps_l2", sa.Float(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "clean",
                "attack",
                "noise",
                "interpolation",
                name="result_kind",
                native_enum=False,
                create_constraint=True,
                length=24,
            ),
            nullable=False,
        ),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("lower_bound", sa.Float(), nullable=False),
        sa.Column("lower_bound_normalised", sa.Float(), nullable=False),
        sa.Column("ci_low", sa.Float(), nullable=False),
        sa.Column("ci_high", sa.Float(), nullable=False),
        sa.Column("sigma_clean", sa.Float(), nullable=False),
        sa.Column("naive_abs_normalised", sa.Float(), nullable=False),
        sa.Column("rms_normalised", sa.Float(), nullable=False),
        sa.CheckConstraint(
            "n_images >= 0", name=op.f("ck_sensitivity_results_n_images_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["analysis_id"],
            ["analyses.id"],
            name=op.f("fk_sensitivity_results_analysis_id_analyses"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["recording_sites.id"],
            name=op.f("fk_sensitivity_results_site_id_recording_sites"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sensitivity_results")),
        sa.UniqueConstraint(
            "analysis_id",
            "site_id",
            "eps_l2",
            "kind",
            name=op.f("uq_sensitivity_results_analysis_id_site_id_eps_l2_kind"),
        ),
    )
    with op.batch_alter_table("sensitivity_results", schema=None) as batch_op:
        batch_op.create_index("ix_sensitivity_results_site_day", ["site_id", "day"], unique=False)

    op.create_table(
        "responses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("presentation_id", sa.Integer(), nullable=False),
        sa.Column("n_sites", sa.Integer(), nullable=False),
        sa.Column("counts", sa.LargeBinary(), nullable=False),
        sa.Column("window_start_ms", sa.Float(), nullable=False),
        sa.Column("window_end_ms", sa.Float(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.CheckConstraint("n_sites > 0", name=op.f("ck_responses_n_sites_positive")),
        sa.CheckConstraint(
            "window_end_ms > window_start_ms", name=op.f("ck_responses_window_ordered")
        ),
        sa.ForeignKeyConstraint(
            ["presentation_id"],
            ["presentations.id"],
            name=op.f("fk_responses_presentation_id_presentations"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_responses")),
        sa.UniqueConstraint("presentation_id", name=op.f("uq_responses_presentation_id")),
    )


def downgrade() -> None:

    op.drop_table("responses")
    with op.batch_alter_table("sensitivity_results", schema=None) as batch_op:
        batch_op.drop_index("ix_sensitivity_results_site_day")

    op.drop_table("sensitivity_results")
    with op.batch_alter_table("presentations", schema=None) as batch_op:
        batch_op.drop_index("ix_presentations_stimulus")

    op.drop_table("presentations")
    with op.batch_alter_table("stimuli", schema=None) as batch_op:
        batch_op.drop_index("ix_stimuli_session_kind")

    op.drop_table("stimuli")
    op.drop_table("session_sites")
    op.drop_table("model_version_sites")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_kind"))

    op.drop_table("jobs")
    op.drop_table("batches")
    op.drop_table("analyses")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_sessions_subject_scheduled")
        batch_op.drop_index(batch_op.f("ix_sessions_rig_id"))

    op.drop_table("sessions")
    op.drop_table("recording_sites")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_target")
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))

    op.drop_table("audit_log")
    op.drop_table("model_versions")
    op.drop_table("arrays")
    op.drop_table("api_tokens")
    op.drop_table("users")
    op.drop_table("subjects")
    op.drop_table("rigs")
    op.drop_table("protocols")
    op.drop_table("images")
    op.drop_table("idempotency_keys")
